//! The records of a WAL segment, read as far as a restore needs: the tablespaces they create.
//! Recovery replays `CREATE TABLESPACE` at the location its record names, an absolute path
//! on the host that runs recovery, and writes the tablespace's relations there; on the
//! cluster's own host that is the live cluster's tablespace.
//!
//! A segment is a run of pages, each with a header (a long one on the first page), and the
//! records run on across pages: a record, or its header, may start on one page and end on the
//! next. Records start at 8-byte boundaries; one that began in the previous segment is
//! continued at this one's start (`xlp_rem_len` bytes).

/// A tablespace a segment's record creates.
#[derive(Debug, PartialEq, Eq)]
pub struct CreatedTablespace {
    pub oid: u32,
    /// Where; `None` when the record runs on into the next segment before its path ends.
    pub location: Option<String>,
}

const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
const XLP_LONG_HEADER: u16 = 0x0002;
const SHORT_PAGE_HEADER: usize = 24;
const LONG_PAGE_HEADER: usize = 40;
/// `XLogRecord`: total length, xid, previous record, info, resource manager, CRC.
const RECORD_HEADER: usize = 24;
const RM_TBLSPC_ID: u8 = 5;
const XLOG_TBLSPC_CREATE: u8 = 0x00;
/// The record's main data, after a one-byte (short) or four-byte (long) length.
const BLOCK_ID_DATA_SHORT: u8 = 255;
const BLOCK_ID_DATA_LONG: u8 = 254;
/// Before the main data: the replication origin (two bytes) and the top-level transaction
/// (four).
const BLOCK_ID_ORIGIN: u8 = 253;
const BLOCK_ID_TOPLEVEL_XID: u8 = 252;
/// More than any path: a longer record is not looked into.
const LARGEST_TABLESPACE_RECORD: usize = 1 << 16;

fn align(n: usize) -> usize {
    n.div_ceil(8) * 8
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Reads a segment's bytes, in pieces of any size, for the tablespaces its records create.
/// Reading stops at the end of the valid WAL: a record of length zero (the rest of a segment
/// after a WAL switch) or a page that is not the next of the segment (recycled leftovers).
pub struct TablespaceScan {
    page: Vec<u8>,
    page_size: usize,
    magic: u16,
    next_page_at: u64,
    pages: u64,
    /// Bytes of record data to pass over before the next record starts.
    skip: usize,
    /// The record read so far: its header, then all of it for one that creates a tablespace.
    record: Vec<u8>,
    want: usize,
    done: bool,
    found: Vec<CreatedTablespace>,
}

impl Default for TablespaceScan {
    fn default() -> Self {
        TablespaceScan {
            page: Vec::new(),
            page_size: 0,
            magic: 0,
            next_page_at: 0,
            pages: 0,
            skip: 0,
            record: Vec::with_capacity(RECORD_HEADER),
            want: RECORD_HEADER,
            done: false,
            found: Vec::new(),
        }
    }
}

impl TablespaceScan {
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() && !self.done {
            // The first page's size is known once its long header is in.
            let size = if self.page_size == 0 {
                LONG_PAGE_HEADER
            } else {
                self.page_size
            };
            let n = (size - self.page.len()).min(data.len());
            self.page.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.page.len() < size {
                return;
            }
            if self.page_size == 0 {
                if !self.start() {
                    self.done = true;
                }
                continue;
            }
            let page = std::mem::take(&mut self.page);
            self.read_page(&page);
            self.page = page;
            self.page.clear();
        }
    }

    /// Takes the segment's geometry from the long header at its start.
    fn start(&mut self) -> bool {
        let h = &self.page;
        let size = u32_at(h, 36) as usize;
        if u16_at(h, 2) & XLP_LONG_HEADER == 0
            || !size.is_power_of_two()
            || !(1024..=65536).contains(&size)
        {
            return false;
        }
        self.page_size = size;
        self.magic = u16_at(h, 0);
        self.next_page_at = u64_at(h, 8);
        true
    }

    fn read_page(&mut self, page: &[u8]) {
        let info = u16_at(page, 2);
        if u16_at(page, 0) != self.magic || u64_at(page, 8) != self.next_page_at {
            self.done = true;
            return;
        }
        if self.pages == 0 && info & XLP_FIRST_IS_CONTRECORD != 0 {
            // What a record begun in the previous segment still holds.
            self.skip = align(u32_at(page, 16) as usize);
        }
        self.pages += 1;
        self.next_page_at += self.page_size as u64;
        let header = if info & XLP_LONG_HEADER != 0 {
            LONG_PAGE_HEADER
        } else {
            SHORT_PAGE_HEADER
        };
        self.read_records(&page[header..]);
    }

    fn read_records(&mut self, mut data: &[u8]) {
        while !data.is_empty() && !self.done {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            let n = (self.want - self.record.len()).min(data.len());
            self.record.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.record.len() < self.want {
                return;
            }
            let total = u32_at(&self.record, 0) as usize;
            if total < RECORD_HEADER {
                // The end of the WAL written to this segment.
                self.done = true;
                return;
            }
            let creates = self.record[17] == RM_TBLSPC_ID
                && self.record[16] & 0xF0 == XLOG_TBLSPC_CREATE
                && total <= LARGEST_TABLESPACE_RECORD;
            if creates && self.want < total {
                self.want = total;
                continue;
            }
            if creates {
                let found = parse_create(&self.record);
                self.found.push(found);
                self.skip = align(total) - total;
            } else {
                self.skip = align(total) - RECORD_HEADER;
            }
            self.record.clear();
            self.want = RECORD_HEADER;
        }
    }

    /// The tablespaces found, including one whose record the segment ends in.
    pub fn finish(mut self) -> Vec<CreatedTablespace> {
        let record = std::mem::take(&mut self.record);
        if self.want > RECORD_HEADER && !self.done {
            let mut cut = parse_create(&record);
            cut.location = None;
            self.found.push(cut);
        }
        self.found
    }
}

/// The tablespace OID and location in a whole `XLOG_TBLSPC_CREATE` record: its main data is
/// `xl_tblspc_create_rec` (the OID, then the path, ending in a zero byte).
fn parse_create(record: &[u8]) -> CreatedTablespace {
    let mut at = RECORD_HEADER;
    let mut main = None;
    while let Some(&id) = record.get(at) {
        match id {
            BLOCK_ID_DATA_SHORT => {
                main = record.get(at + 1).map(|&len| (at + 2, usize::from(len)));
                break;
            }
            BLOCK_ID_DATA_LONG if record.len() >= at + 5 => {
                main = Some((at + 5, u32_at(record, at + 1) as usize));
                break;
            }
            BLOCK_ID_ORIGIN => at += 3,
            BLOCK_ID_TOPLEVEL_XID => at += 5,
            _ => break,
        }
    }
    // All of it, or what the segment holds of it.
    let data = main.and_then(|(start, len)| record.get(start..record.len().min(start + len)));
    let oid = data.and_then(|d| d.get(..4)).map_or(0, |d| u32_at(d, 0));
    let location = data
        .and_then(|d| d.get(4..))
        .and_then(|p| p.split(|&b| b == 0).next())
        .filter(|p| !p.is_empty())
        .map(|p| String::from_utf8_lossy(p).into_owned());
    CreatedTablespace { oid, location }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 8192;
    const PAGES: usize = 8;
    const START: u64 = 0x0300_0000;

    /// A segment of `PAGES` pages at LSN `START` holding `stream` (record bytes, the first
    /// `rem` of them a record continued from the previous segment) across its pages.
    fn segment(stream: &[u8], rem: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = stream;
        let mut rem = rem;
        for i in 0..PAGES {
            let long = i == 0;
            let header = if long {
                LONG_PAGE_HEADER
            } else {
                SHORT_PAGE_HEADER
            };
            let mut page = vec![0u8; PAGE];
            let mut info = if long { XLP_LONG_HEADER } else { 0 };
            if rem > 0 {
                info |= XLP_FIRST_IS_CONTRECORD;
            }
            page[0..2].copy_from_slice(&0xD110u16.to_ne_bytes());
            page[2..4].copy_from_slice(&info.to_ne_bytes());
            page[8..16].copy_from_slice(&(START + (i * PAGE) as u64).to_ne_bytes());
            page[16..20].copy_from_slice(&(rem as u32).to_ne_bytes());
            if long {
                page[32..36].copy_from_slice(&((PAGES * PAGE) as u32).to_ne_bytes());
                page[36..40].copy_from_slice(&(PAGE as u32).to_ne_bytes());
            }
            let n = (PAGE - header).min(rest.len());
            page[header..header + n].copy_from_slice(&rest[..n]);
            rest = &rest[n..];
            rem = rem.saturating_sub(n);
            out.extend_from_slice(&page);
        }
        out
    }

    fn record(rmid: u8, info: u8, main: &[u8]) -> Vec<u8> {
        let mut r = vec![0u8; RECORD_HEADER];
        if main.len() < 256 {
            r.extend_from_slice(&[BLOCK_ID_DATA_SHORT, main.len() as u8]);
        } else {
            r.push(BLOCK_ID_DATA_LONG);
            r.extend_from_slice(&(main.len() as u32).to_ne_bytes());
        }
        r.extend_from_slice(main);
        let total = r.len() as u32;
        r[0..4].copy_from_slice(&total.to_ne_bytes());
        r[16] = info;
        r[17] = rmid;
        r.resize(align(r.len()), 0);
        r
    }

    fn create(oid: u32, path: &str) -> Vec<u8> {
        let mut main = oid.to_ne_bytes().to_vec();
        main.extend_from_slice(path.as_bytes());
        main.push(0);
        record(RM_TBLSPC_ID, XLOG_TBLSPC_CREATE, &main)
    }

    fn scan(segment: &[u8], piece: usize) -> Vec<CreatedTablespace> {
        let mut scan = TablespaceScan::default();
        for p in segment.chunks(piece) {
            scan.feed(p);
        }
        scan.finish()
    }

    fn found(oid: u32, path: &str) -> CreatedTablespace {
        CreatedTablespace {
            oid,
            location: Some(path.into()),
        }
    }

    #[test]
    fn creations_are_found_across_pages_and_after_a_continued_record() {
        // A record continued from the previous segment, records of other kinds (a large one
        // over several pages), a creation whose header is cut by a page's end, another
        // with a long main data length, then the end of the WAL.
        let mut stream = vec![0xAB; 100];
        stream.resize(align(100), 0);
        stream.extend(record(10, 0x00, &[7; 200]));
        stream.extend(record(RM_TBLSPC_ID, 0x10, &[1, 0, 0, 0])); // a DROP
        stream.extend(record(10, 0x00, &vec![9; 20_000]));
        let cut = PAGE - LONG_PAGE_HEADER + 3 * (PAGE - SHORT_PAGE_HEADER) - stream.len() - 8;
        stream.extend(record(10, 0x00, &vec![3; cut - RECORD_HEADER - 5]));
        stream.extend(create(16390, "/srv/ts/one"));
        stream.extend(create(16391, &format!("/srv/{}", "x".repeat(300))));
        for piece in [1, 7, 4096, 1 << 20] {
            assert_eq!(
                scan(&segment(&stream, 100), piece),
                [
                    found(16390, "/srv/ts/one"),
                    found(16391, &format!("/srv/{}", "x".repeat(300)))
                ],
                "pieces of {piece}"
            );
        }
    }

    #[test]
    fn reading_stops_at_the_end_of_the_wal() {
        // After a record of length zero, or on a page from another segment, nothing counts.
        let mut stream = record(10, 0x00, &[1; 50]);
        stream.extend(vec![0u8; 64]);
        stream.extend(create(16390, "/after/the/end"));
        assert_eq!(scan(&segment(&stream, 0), 4096), []);
        let mut seg = segment(&create(16390, "/srv/ts"), 0);
        seg[PAGE + 8..PAGE + 16].copy_from_slice(&0u64.to_ne_bytes());
        let late = PAGE * 2 + SHORT_PAGE_HEADER;
        seg[late..late + 40].copy_from_slice(&create(16391, "/old")[..40]);
        assert_eq!(scan(&seg, 4096), [found(16390, "/srv/ts")]);
        // Not a segment at all.
        assert_eq!(scan(&[0u8; PAGE], 4096), []);
    }

    #[test]
    fn a_creation_the_segment_ends_in_has_no_location() {
        let room = PAGES * PAGE - LONG_PAGE_HEADER - (PAGES - 1) * SHORT_PAGE_HEADER;
        let mut stream = record(10, 0x00, &vec![5; room - 32 - RECORD_HEADER - 5]);
        stream.extend(create(16392, "/a/path/longer/than/what/fits"));
        stream.truncate(room);
        assert_eq!(
            scan(&segment(&stream, 0), 4096),
            [CreatedTablespace {
                oid: 16392,
                location: None
            }]
        );
    }
}
