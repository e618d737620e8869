//! Shared helpers for the command-line tests: a sandbox with its own settings, repository,
//! registry and key, and a snapshot of a directory tree for byte-exact comparisons.
#![allow(dead_code)]

pub mod moto;
pub mod proxy;

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::Digest;

pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn ok(self) -> Run {
        assert_eq!(
            self.code, 0,
            "expected success\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }
    pub fn code(self, code: i32) -> Run {
        assert_eq!(
            self.code, code,
            "expected exit {code}\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }
    /// JSON lines of stdout.
    pub fn json(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Runs a command to its end and asserts it succeeded, showing its stderr otherwise; returns
/// its output as bytes (for binary streams, where `Run` would not do).
pub fn output_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", cmd.get_program()));
    assert!(
        out.status.success(),
        "{:?} failed: {}",
        cmd.get_program(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_drctl")
}

impl Sandbox {
    /// A sandbox with drctl.yaml, an empty policies directory, and `drctl init` done.
    pub fn new() -> Sandbox {
        Self::with_settings("")
    }

    /// Like [`Sandbox::new`], with extra lines appended to drctl.yaml.
    pub fn with_settings(extra: &str) -> Sandbox {
        Self::with_repository("file://repo", extra)
    }

    /// Like [`Sandbox::with_settings`], with the repository at `repository`.
    pub fn with_repository(repository: &str, extra: &str) -> Sandbox {
        Self::with_config(&format!(
            "environment: test\nrepository: {repository}\nregistry: sqlite://registry.db\n\
             recipients-file: keys/recipients.txt\nidentity-file: keys/identity.txt\n{extra}"
        ))
    }

    /// A sandbox whose drctl.yaml is `config`; `drctl init` done.
    pub fn with_config(config: &str) -> Sandbox {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("policies")).unwrap();
        std::fs::write(dir.path().join("drctl.yaml"), config).unwrap();
        let sb = Sandbox { dir };
        sb.run(&["init"]).ok();
        sb
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.args(args)
            .current_dir(self.path())
            .env("DRCTL_CONFIG", self.path().join("drctl.yaml"))
            .env_remove("DRCTL_IDENTITY")
            .env_remove("DRCTL_LOG");
        moto::env_for(&mut c);
        c
    }

    pub fn run(&self, args: &[&str]) -> Run {
        self.cmd(args).output().expect("run drctl").into()
    }

    pub fn policy(&self, name: &str, yaml: &str) {
        std::fs::write(
            self.path().join("policies").join(format!("{name}.yaml")),
            yaml,
        )
        .unwrap();
    }

    /// A `files` policy over `paths`.
    pub fn files_policy(&self, name: &str, paths: &[&Path]) {
        let list: Vec<String> = paths
            .iter()
            .map(|p| format!("{:?}", p.display().to_string()))
            .collect();
        self.policy(
            name,
            &format!(
                "name: {name}\nsource:\n  kind: files\n  paths: [{}]\n",
                list.join(", ")
            ),
        );
    }

    /// A `command` policy running `argv`.
    pub fn command_policy(&self, name: &str, argv: &[&str], artifact: &str) {
        let list: Vec<String> = argv.iter().map(|a| format!("{a:?}")).collect();
        self.policy(
            name,
            &format!(
                "name: {name}\nsource:\n  kind: command\n  command: [{}]\n  artifact: {artifact}\n",
                list.join(", ")
            ),
        );
    }

    /// Runs a backup and returns its ID.
    pub fn backup(&self, policy: &str) -> String {
        let run = self.run(&["--json", "backup", "--policy", policy]).ok();
        let v = &run.json()[0];
        v["backup_id"].as_str().expect("backup_id").to_owned()
    }

    pub fn identity(&self) -> PathBuf {
        self.path().join("keys/identity.txt")
    }

    /// The directory of one backup in the repository.
    pub fn backup_dir(&self, policy: &str, id: &str) -> PathBuf {
        self.path().join("repo/test").join(policy).join(id)
    }

    /// Status of a backup in the registry.
    pub fn status(&self, id: &str) -> String {
        let run = self.run(&["--json", "show", id]).ok();
        run.json()[0]["status"].as_str().unwrap().to_owned()
    }

    /// Records of the environment, newest first, as JSON.
    /// The regions of a backup's recorded copies, in the order they were recorded.
    pub fn location_regions(record: &serde_json::Value) -> Vec<String> {
        record["locations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["region"].as_str().unwrap().to_owned())
            .collect()
    }

    pub fn records(&self) -> Vec<serde_json::Value> {
        self.run(&["--json", "list", "--limit", "1000"]).ok().json()
    }
}

/// Where a restore of `source` lands inside `target` (archive paths are absolute paths
/// without the leading `/`).
pub fn restored(target: &Path, source: &Path) -> PathBuf {
    target.join(source.strip_prefix("/").unwrap())
}

#[derive(Debug, PartialEq, Eq)]
pub struct Node {
    kind: &'static str,
    mode: u32,
    mtime: Option<i64>,
    size: u64,
    sha256: Option<String>,
    link: Option<Vec<u8>>,
    /// The first path (in sorted order) sharing this node's inode, for hard links.
    hardlink_of: Option<Vec<u8>>,
}

/// Everything a restore must reproduce, per relative path (as bytes).
pub fn snapshot(root: &Path) -> BTreeMap<Vec<u8>, Node> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), Vec<u8>> = BTreeMap::new();
    let mut paths = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                stack.push(p.clone());
            }
            paths.push(p);
        }
    }
    paths.sort_by(|a, b| a.as_os_str().as_bytes().cmp(b.as_os_str().as_bytes()));
    for p in paths {
        let m = std::fs::symlink_metadata(&p).unwrap();
        let rel = p
            .strip_prefix(root)
            .unwrap()
            .as_os_str()
            .as_bytes()
            .to_vec();
        let ft = m.file_type();
        let (kind, sha256, link) = if ft.is_dir() {
            ("dir", None, None)
        } else if ft.is_symlink() {
            (
                "symlink",
                None,
                Some(
                    std::fs::read_link(&p)
                        .unwrap()
                        .as_os_str()
                        .as_bytes()
                        .to_vec(),
                ),
            )
        } else if ft.is_file() {
            let data = std::fs::read(&p).unwrap();
            ("file", Some(hex::encode(sha2::Sha256::digest(&data))), None)
        } else {
            ("special", None, None)
        };
        let hardlink_of = if ft.is_file() && m.nlink() > 1 {
            let first = inodes
                .entry((m.dev(), m.ino()))
                .or_insert_with(|| rel.clone())
                .clone();
            (first != rel).then_some(first)
        } else {
            None
        };
        out.insert(
            rel,
            Node {
                kind,
                mode: if ft.is_symlink() {
                    0
                } else {
                    m.mode() & 0o7777
                },
                mtime: (!ft.is_symlink()).then_some(m.mtime()),
                size: if ft.is_file() { m.len() } else { 0 },
                sha256,
                link,
                hardlink_of,
            },
        );
    }
    out
}

/// The files under `dir` (following links to directories), with their contents.
pub fn file_contents(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(file_contents(&path));
        } else {
            out.insert(path.clone(), std::fs::read(&path).unwrap());
        }
    }
    out
}

pub fn assert_same_tree(expected: &Path, actual: &Path) {
    let (a, b) = (snapshot(expected), snapshot(actual));
    assert!(!a.is_empty(), "empty source tree {}", expected.display());
    for (path, node) in &a {
        match b.get(path) {
            Some(other) => assert_eq!(node, other, "{}", String::from_utf8_lossy(path)),
            None => panic!(
                "{} missing from {}",
                String::from_utf8_lossy(path),
                actual.display()
            ),
        }
    }
    for path in b.keys() {
        assert!(
            a.contains_key(path),
            "unexpected {} in {}",
            String::from_utf8_lossy(path),
            actual.display()
        );
    }
}

/// Finds the single file matching `pred` under `dir`.
pub fn find_file(dir: &Path, pred: impl Fn(&str) -> bool) -> PathBuf {
    let found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| pred(&p.file_name().unwrap().to_string_lossy()))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one match in {}: {found:?}",
        dir.display()
    );
    found.into_iter().next().unwrap()
}

/// The WAL segment size of the test clusters (initdb's default).
pub const WAL_SEGMENT: u64 = 16 << 20;

/// A WAL segment `name` (of 16 MiB segments) as far as `wal push` checks it: the long page
/// header PostgreSQL starts it with, naming its own position, then `len - 40` bytes of `fill`.
pub fn wal_segment(name: &str, len: usize, fill: u8) -> Vec<u8> {
    let (timeline, segno) = drctl::source::postgres::parse_segment(name, WAL_SEGMENT).unwrap();
    let mut b = vec![fill; len.max(40)];
    b[..40].fill(0);
    b[0..2].copy_from_slice(&0xD110u16.to_ne_bytes());
    b[2..4].copy_from_slice(&2u16.to_ne_bytes());
    b[4..8].copy_from_slice(&timeline.to_ne_bytes());
    b[8..16].copy_from_slice(&(segno * WAL_SEGMENT).to_ne_bytes());
    b[32..36].copy_from_slice(&(16u32 << 20).to_ne_bytes());
    b[36..40].copy_from_slice(&8192u32.to_ne_bytes());
    b
}
