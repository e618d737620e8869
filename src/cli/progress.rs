//! Progress on stderr for long work, drawn only on a terminal.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    counter: Arc<AtomicU64>,
    bar: Option<ProgressBar>,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    pub fn start(enabled: bool, label: &str, total: Option<u64>) -> Progress {
        let counter = Arc::new(AtomicU64::new(0));
        let target = ProgressDrawTarget::stderr();
        if !enabled || target.is_hidden() {
            return Progress {
                counter,
                bar: None,
                ticker: None,
            };
        }
        let bar = match total {
            Some(t) => ProgressBar::with_draw_target(Some(t), target).with_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            ),
            None => ProgressBar::with_draw_target(None, target).with_style(
                ProgressStyle::with_template("{spinner} {msg} {bytes} {bytes_per_sec} {elapsed}")
                    .expect("valid template"),
            ),
        };
        bar.set_message(label.to_owned());
        let (c, b) = (counter.clone(), bar.clone());
        let ticker = tokio::spawn(async move {
            loop {
                b.set_position(c.load(Ordering::Relaxed));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Progress {
            counter,
            bar: Some(bar),
            ticker: Some(ticker),
        }
    }

    pub fn counter(&self) -> Option<Arc<AtomicU64>> {
        Some(self.counter.clone())
    }

    pub fn finish(self) {
        if let Some(t) = self.ticker {
            t.abort();
        }
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}
