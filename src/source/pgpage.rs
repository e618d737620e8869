//! PostgreSQL data page checksums, checked as a base backup reads the data directory, as
//! `pg_basebackup` and pgBackRest check them: the server's algorithm (FNV-1a in 32 parallel
//! lanes over the page with its checksum field as zero, folded with the block number), and
//! which files and pages it applies to.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::postgres::is_digits;
use crate::{Error, Result};

const LANES: usize = 32;
const ROW: usize = 4 * LANES;
const FNV_PRIME: u32 = 16_777_619;
/// Each lane's starting value.
const OFFSETS: [u32; LANES] = [
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C,
    0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB,
    0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4,
    0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E, 0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
];
/// Where the page header keeps the checksum (`pd_checksum`) and the start of the free space's
/// end (`pd_upper`, zero on a page never initialised).
const CHECKSUM_AT: usize = 8;
const UPPER_AT: usize = 14;

fn mix(sum: u32, value: u32) -> u32 {
    let t = sum ^ value;
    t.wrapping_mul(FNV_PRIME) ^ (t >> 17)
}

fn mix_row(sums: &mut [u32; LANES], row: &[u8]) {
    for (sum, word) in sums.iter_mut().zip(row.chunks_exact(4)) {
        // The server reads the page as native 32-bit words.
        *sum = mix(
            *sum,
            u32::from_ne_bytes([word[0], word[1], word[2], word[3]]),
        );
    }
}

/// The checksum the server stores in a page: `page` is one whole block whose size is a
/// multiple of 128 bytes, `block` its number in the relation fork.
pub fn page_checksum(page: &[u8], block: u32) -> u16 {
    let mut sums = OFFSETS;
    let mut first = [0u8; ROW];
    first.copy_from_slice(&page[..ROW]);
    first[CHECKSUM_AT..CHECKSUM_AT + 2].fill(0);
    mix_row(&mut sums, &first);
    for row in page[ROW..].chunks_exact(ROW) {
        mix_row(&mut sums, row);
    }
    for _ in 0..2 {
        for sum in &mut sums {
            *sum = mix(*sum, 0);
        }
    }
    let folded = sums.iter().fold(0, |a, s| a ^ s) ^ block;
    (folded % 65535 + 1) as u16
}

/// Native-endian integers of the server's on-disk formats, at `at`.
pub(super) fn u16_at(page: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([page[at], page[at + 1]])
}

pub(super) fn u64_at(page: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(page[at..at + 8].try_into().expect("8 bytes"))
}

pub(super) fn u32_at(page: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([page[at], page[at + 1], page[at + 2], page[at + 3]])
}

/// What a page read from the data directory turned out to be.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Good,
    /// Never initialised (all zeros), or changed since the backup started: recovery rewrites
    /// it from the WAL's full-page image, so a read that caught it half-written is no fault.
    Unchecked,
    /// `computed` differs from `stored`; `None` for a page marked new that is not all zeros,
    /// which the server itself refuses to read.
    Bad {
        stored: u16,
        computed: Option<u16>,
    },
}

fn judge(page: &[u8], block: u32, start_lsn: u64) -> Verdict {
    if u16_at(page, UPPER_AT) == 0 {
        return if page.iter().all(|&b| b == 0) {
            Verdict::Unchecked
        } else {
            Verdict::Bad {
                stored: u16_at(page, CHECKSUM_AT),
                computed: None,
            }
        };
    }
    let lsn = (u64::from(u32_at(page, 0)) << 32) | u64::from(u32_at(page, 4));
    if lsn >= start_lsn {
        return Verdict::Unchecked;
    }
    let stored = u16_at(page, CHECKSUM_AT);
    let computed = page_checksum(page, block);
    if computed == stored {
        Verdict::Good
    } else {
        Verdict::Bad {
            stored,
            computed: Some(computed),
        }
    }
}

/// A page that failed its check twice.
#[derive(Debug)]
pub struct BadPage {
    /// The file, relative to the data directory.
    pub file: PathBuf,
    /// The block's number within the file.
    pub block: u64,
    /// Its number within the relation fork, which segments after the first (`.1`, `.2`)
    /// do not start at zero.
    fork_block: u32,
    stored: u16,
    computed: Option<u16>,
}

impl fmt::Display for BadPage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} block {} (", self.file.display(), self.block)?;
        if u64::from(self.fork_block) != self.block {
            write!(f, "block {} of the fork; ", self.fork_block)?;
        }
        match self.computed {
            Some(c) => write!(f, "checksum {:#06x}, computed {c:#06x})", self.stored),
            None => write!(f, "a new page that is not all zeros)"),
        }
    }
}

/// How many of the pages that fail are named; the rest are counted.
const NAMED: usize = 10;

/// The page checks of one base backup: the pages of relation files under `global/` and
/// `base/`, other than those changed since the backup's start LSN.
pub struct PageCheck {
    start_lsn: u64,
    block_size: usize,
    blocks_per_segment: u32,
    good: Cell<u64>,
    skipped: Cell<u64>,
    bad: RefCell<Vec<BadPage>>,
    bad_count: Cell<u64>,
    /// The first error reading a page again.
    error: RefCell<Option<Error>>,
}

/// What the checks of a whole backup found, once none failed.
pub struct PageCounts {
    /// Pages whose checksum matched.
    pub good: u64,
    /// Pages left to recovery: never initialised, or written since the backup started.
    pub skipped: u64,
}

impl PageCheck {
    /// `block_size` is the server's `block_size`, `blocks_per_segment` its `segment_size` in
    /// blocks (a relation file holds that many before the next, `.1`, `.2`, begins).
    pub fn new(start_lsn: u64, block_size: usize, blocks_per_segment: u32) -> Result<Self> {
        if !block_size.is_power_of_two() || !(1024..=32768).contains(&block_size) {
            return Err(Error::failure(format!(
                "the server's block_size {block_size} is not one PostgreSQL builds with"
            )));
        }
        Ok(PageCheck {
            start_lsn,
            block_size,
            blocks_per_segment,
            good: Cell::new(0),
            skipped: Cell::new(0),
            bad: RefCell::new(Vec::new()),
            bad_count: Cell::new(0),
            error: RefCell::new(None),
        })
    }

    /// The number of the first block of the relation file `rel` (relative to the data
    /// directory), or `None` for a file whose pages carry no checksum.
    fn first_block(&self, rel: &Path) -> Option<u32> {
        let parts: Vec<&str> = rel.iter().map(|p| p.to_str()).collect::<Option<_>>()?;
        let name = match parts.as_slice() {
            ["global", name] => name,
            ["base", db, name] if is_digits(db) => name,
            ["pg_tblspc", ts, version, db, name]
                if is_digits(ts) && version.starts_with("PG_") && is_digits(db) =>
            {
                name
            }
            _ => return None,
        };
        let (stem, segment) = match name.split_once('.') {
            Some((stem, segment)) if is_digits(segment) => (stem, segment.parse::<u32>().ok()?),
            Some(_) => return None,
            None => (*name, 0),
        };
        let (node, fork) = stem.split_once('_').unwrap_or((stem, ""));
        if !is_digits(node) || !["", "fsm", "vm", "init"].contains(&fork) {
            return None;
        }
        // As the server numbers blocks: in 32 bits.
        Some(segment.wrapping_mul(self.blocks_per_segment))
    }

    /// What checks the pages of `path` (`rel` relative to the data directory) as they are
    /// read, if it holds pages with checksums.
    pub fn file(&self, path: &Path, rel: &Path) -> Option<FilePages<'_>> {
        let first_block = self.first_block(rel)?;
        Some(FilePages {
            check: self,
            path: path.to_owned(),
            rel: rel.to_owned(),
            first_block,
            index: 0,
            partial: Vec::with_capacity(self.block_size),
            again: None,
        })
    }

    fn count(&self, counter: &Cell<u64>) {
        counter.set(counter.get() + 1);
    }

    /// The counts, or the error for pages that failed twice (naming the first of them), or
    /// for a page that could not be read again.
    pub fn finish(self) -> Result<PageCounts> {
        if let Some(e) = self.error.into_inner() {
            return Err(e);
        }
        let bad = self.bad.into_inner();
        let count = self.bad_count.get();
        if count == 0 {
            return Ok(PageCounts {
                good: self.good.get(),
                skipped: self.skipped.get(),
            });
        }
        let mut named: Vec<String> = bad.iter().map(ToString::to_string).collect();
        if count > bad.len() as u64 {
            named.push(format!("and {} more", count - bad.len() as u64));
        }
        let (pages, its) = match count {
            1 => ("a page".to_string(), "its"),
            n => (format!("{n} pages"), "their"),
        };
        Err(Error::integrity(format!(
            "{pages} of the data directory failed {its} checksum, read twice: {}",
            named.join(", ")
        ))
        .hint("the cluster holds damaged data: find the relations (SELECT pg_filenode_relation(0, N) for a file named N, or pg_amcheck) and repair them, from an earlier backup if need be. To go on taking backups meanwhile, with the damaged pages copied as they are, set verify-checksums: false in the policy"))
    }
}

/// The pages of one file, fed in the order they are read.
pub struct FilePages<'a> {
    check: &'a PageCheck,
    path: PathBuf,
    rel: PathBuf,
    first_block: u32,
    /// Pages of this file seen so far.
    index: u64,
    /// The start of a page cut by the end of a read.
    partial: Vec<u8>,
    /// The file, opened to read a page again.
    again: Option<std::fs::File>,
}

impl FilePages<'_> {
    pub fn feed(&mut self, mut data: &[u8]) {
        let size = self.check.block_size;
        if !self.partial.is_empty() {
            let take = (size - self.partial.len()).min(data.len());
            self.partial.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.partial.len() < size {
                return;
            }
            let page = std::mem::take(&mut self.partial);
            self.page(&page);
            self.partial = page;
            self.partial.clear();
        }
        let mut pages = data.chunks_exact(size);
        for page in &mut pages {
            self.page(page);
        }
        self.partial.extend_from_slice(pages.remainder());
    }

    fn page(&mut self, page: &[u8]) {
        let check = self.check;
        let index = self.index;
        self.index += 1;
        let block = self.first_block.wrapping_add(index as u32);
        let verdict = match judge(page, block, check.start_lsn) {
            // Read again, as pg_basebackup does: the server may have been writing the page.
            Verdict::Bad { .. } => match self.read_again(index, page.len()) {
                Ok(Some(again)) => judge(&again, block, check.start_lsn),
                // Truncated meanwhile: recovery replays the truncation.
                Ok(None) => Verdict::Unchecked,
                Err(e) => {
                    check.error.borrow_mut().get_or_insert(e);
                    return;
                }
            },
            verdict => verdict,
        };
        match verdict {
            Verdict::Good => check.count(&check.good),
            Verdict::Unchecked => check.count(&check.skipped),
            Verdict::Bad { stored, computed } => {
                check.count(&check.bad_count);
                let mut bad = check.bad.borrow_mut();
                if bad.len() < NAMED {
                    bad.push(BadPage {
                        file: self.rel.clone(),
                        block: index,
                        fork_block: block,
                        stored,
                        computed,
                    });
                }
            }
        }
    }

    /// Page `index` as the file holds it now; `None` if the file no longer reaches it.
    fn read_again(&mut self, index: u64, size: usize) -> Result<Option<Vec<u8>>> {
        let gone = |e: &std::io::Error| {
            matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::UnexpectedEof
            )
        };
        let failed = |e| Error::io(format!("read {} again", self.path.display()), e);
        let file = match &self.again {
            Some(file) => file,
            None => match std::fs::File::open(&self.path) {
                Ok(file) => self.again.insert(file),
                Err(e) if gone(&e) => return Ok(None),
                Err(e) => return Err(failed(e)),
            },
        };
        let mut page = vec![0u8; size];
        match file.read_exact_at(&mut page, index * size as u64) {
            Ok(()) => Ok(Some(page)),
            Err(e) if gone(&e) => Ok(None),
            Err(e) => Err(failed(e)),
        }
    }
}

impl Drop for FilePages<'_> {
    fn drop(&mut self) {
        if !self.partial.is_empty() {
            tracing::debug!(
                file = %self.rel.display(),
                "the file ends in part of a page, which is not checked"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOCK: usize = 8192;

    /// A page with a header (LSN 0/1000, pd_upper set) and varied contents.
    fn page() -> Vec<u8> {
        let mut page: Vec<u8> = (0..BLOCK).map(|i| (i * 31 % 251) as u8).collect();
        page[..8].copy_from_slice(&[0, 0, 0, 0, 0x00, 0x10, 0, 0]);
        page[UPPER_AT..UPPER_AT + 2].copy_from_slice(&4096u16.to_ne_bytes());
        let sum = page_checksum(&page, 7);
        page[CHECKSUM_AT..CHECKSUM_AT + 2].copy_from_slice(&sum.to_ne_bytes());
        page
    }

    #[test]
    fn checksums_match_the_servers() {
        // Computed by the server's algorithm (checksum_impl.h) for these pages.
        let zeros = vec![0u8; BLOCK];
        assert_eq!(page_checksum(&zeros, 0), 0xc6aa);
        assert_eq!(page_checksum(&zeros, 1), 0xc6ab);
        let p = page();
        assert_eq!(page_checksum(&p, 7), 0x5893);
        // The stored checksum itself does not count.
        let mut q = p.clone();
        q[CHECKSUM_AT] ^= 0xff;
        assert_eq!(page_checksum(&q, 7), page_checksum(&p, 7));
    }

    #[test]
    fn a_damaged_page_fails_unless_changed_since_the_start() {
        let p = page();
        assert_eq!(judge(&p, 7, 0x2000), Verdict::Good);
        assert!(matches!(judge(&p, 8, 0x2000), Verdict::Bad { .. }));
        let mut damaged = p.clone();
        damaged[5000] ^= 1;
        assert!(matches!(judge(&damaged, 7, 0x2000), Verdict::Bad { .. }));
        // Written since the backup started (LSN 0/1000 ≥ start): left to recovery.
        assert_eq!(judge(&damaged, 7, 0x1000), Verdict::Unchecked);
        // A new page must be all zeros.
        assert_eq!(judge(&[0u8; BLOCK], 7, 0x2000), Verdict::Unchecked);
        let mut new = [0u8; BLOCK];
        new[100] = 1;
        assert_eq!(
            judge(&new, 7, 0x2000),
            Verdict::Bad {
                stored: 0,
                computed: None
            }
        );
    }

    #[test]
    fn relation_files_and_their_first_blocks() {
        let check = PageCheck::new(0, BLOCK, 131072).unwrap();
        let first = |p: &str| check.first_block(Path::new(p));
        assert_eq!(first("base/5/16384"), Some(0));
        assert_eq!(first("base/5/16384.2"), Some(262144));
        assert_eq!(first("base/5/16384_fsm"), Some(0));
        assert_eq!(first("base/5/16384_vm.1"), Some(131072));
        assert_eq!(first("base/5/16384_init"), Some(0));
        assert_eq!(first("global/1262"), Some(0));
        assert_eq!(
            first("pg_tblspc/16390/PG_15_202209061/5/16400.1"),
            Some(131072)
        );
        for none in [
            "global/pg_control",
            "global/pg_filenode.map",
            "base/5/pg_filenode.map",
            "base/5/PG_VERSION",
            "base/5/16384_foo",
            "base/5/16384.x",
            "base/x/16384",
            "pg_xact/0000",
            "base/5/sub/16384",
            "pg_tblspc/16390/PG_15_202209061/16400",
            "pg_tblspc/16390/other/5/16400",
        ] {
            assert_eq!(first(none), None, "{none}");
        }
    }

    /// Feeds `read` (in pieces of `piece` bytes) as the pages of `base/5/16384`, which holds
    /// `disk` when read again, starting at block `first`.
    fn feed(disk: &[u8], read: &[u8], piece: usize, first: u32) -> PageCheck {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("16384");
        std::fs::write(&path, disk).unwrap();
        let check = PageCheck::new(0x2000, BLOCK, 131072).unwrap();
        let mut pages = check.file(&path, Path::new("base/5/16384")).unwrap();
        pages.first_block = first;
        for piece in read.chunks(piece) {
            pages.feed(piece);
        }
        drop(pages);
        check
    }

    #[test]
    fn pages_cut_across_reads_are_checked_whole() {
        let good = page();
        let mut damaged = good.clone();
        damaged[3000] ^= 0x40;
        // Blocks 6, 7 and 8 of the fork: new, good (its checksum is block 7's), damaged.
        let file = [vec![0u8; BLOCK], good, damaged].concat();
        let check = feed(&file, &file, 3000, 6);
        assert_eq!((check.good.get(), check.skipped.get()), (1, 1));
        let e = check.finish().err().unwrap();
        assert_eq!(e.kind(), crate::ErrorKind::Integrity);
        assert!(
            e.to_string().contains(
                "a page of the data directory failed its checksum, read twice: \
                 base/5/16384 block 2 (block 8 of the fork; checksum 0x"
            ),
            "{e}"
        );
    }

    #[test]
    fn a_page_read_while_written_is_read_again() {
        let good = page();
        let mut torn = good.clone();
        torn[6000..].fill(0x55);
        // Whole on disk when read again.
        let check = feed(
            &[vec![0u8; BLOCK], good.clone()].concat(),
            &[vec![0u8; BLOCK], torn.clone()].concat(),
            BLOCK,
            6,
        );
        assert_eq!((check.good.get(), check.skipped.get()), (1, 1));
        assert!(check.finish().is_ok());
        // Truncated meanwhile: left to recovery.
        let check = feed(&[], &[vec![0u8; BLOCK], torn].concat(), 1 << 20, 6);
        assert_eq!(check.skipped.get(), 2);
        assert!(check.finish().is_ok());
    }

    #[test]
    fn many_damaged_pages_are_counted_and_the_first_named() {
        let mut damaged = page();
        damaged[3000] ^= 0x40;
        let file = damaged.repeat(25);
        let e = feed(&file, &file, 1 << 20, 7)
            .finish()
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("25 pages of the data directory failed their checksum"),
            "{e}"
        );
        assert!(
            e.contains("base/5/16384 block 9 (block 16 of the fork;"),
            "{e}"
        );
        assert!(!e.contains("block 10 ("), "{e}");
        assert!(e.contains(", and 15 more"), "{e}");
    }
}
