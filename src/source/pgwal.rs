//! The records of a WAL segment, read as far as a restore needs: the tablespaces they create.
//! Recovery replays `CREATE TABLESPACE` at the location its record names, an absolute path
//! on the host that runs recovery, and writes the tablespace's relations there; on the
//! cluster's own host that is the live cluster's tablespace.
//!
//! A segment is a run of pages, each with a header (a long one on the first page), and the
//! records run on across pages: a record, or its header, may start on one page and end on the
//! next, or in the next segment. Records start at 8-byte boundaries; a page that continues
//! a record says so (`XLP_FIRST_IS_CONTRECORD`, with the bytes left in `xlp_rem_len`).

use super::pgpage::{u16_at, u32_at, u64_at};

/// A tablespace a segment's record creates.
#[derive(Debug, PartialEq, Eq)]
pub struct CreatedTablespace {
    pub oid: u32,
    /// Where: an absolute path, or empty for a tablespace inside the data directory.
    pub location: String,
    /// Its record began in the previous segment.
    pub continued: bool,
}

/// The start of a record a segment ends in the middle of, which may create a tablespace:
/// the next segment's scan completes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Carry {
    /// The timeline and address of the page that must continue it.
    pub timeline: u32,
    pub next_page_at: u64,
    pub record: Vec<u8>,
}

/// What a scan found: the creations, whether the input was a WAL segment at all, and the
/// record it ends in, if that may be one.
#[derive(Debug, Default)]
pub struct ScanEnd {
    pub created: Vec<CreatedTablespace>,
    pub segment: bool,
    pub carry: Option<Carry>,
}

const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
pub(super) const XLP_LONG_HEADER: u16 = 0x0002;
const SHORT_PAGE_HEADER: usize = 24;
/// The long page header at the start of every segment: magic, info, timeline, page
/// address, remaining length, padding, system identifier, segment size, page size.
pub(super) const LONG_PAGE_HEADER: usize = 40;
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

/// Reads a segment's bytes, in pieces of any size, for the tablespaces its records create.
/// Reading stops at the end of the valid WAL: a record of length zero (the rest of a segment
/// after a WAL switch) or a page that is not the next of the segment (recycled leftovers).
pub struct TablespaceScan {
    page: Vec<u8>,
    page_size: usize,
    magic: u16,
    next_page_at: u64,
    timeline: u32,
    pages: u64,
    /// Records earlier segments ended in, until the first page shows whether it continues
    /// one of them.
    resume: Vec<Carry>,
    /// The record in progress began in the previous segment.
    resumed: bool,
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
            timeline: 0,
            pages: 0,
            resume: Vec::new(),
            resumed: false,
            skip: 0,
            record: Vec::with_capacity(RECORD_HEADER),
            want: RECORD_HEADER,
            done: false,
            found: Vec::new(),
        }
    }
}

impl TablespaceScan {
    /// A scan that completes the record the previous segment ended in, if it is one of
    /// `carries` (the segment's first page tells which).
    pub fn continuing(carries: Vec<Carry>) -> Self {
        TablespaceScan {
            resume: carries,
            ..TablespaceScan::default()
        }
    }

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
        let continues = info & XLP_FIRST_IS_CONTRECORD != 0;
        self.timeline = u32_at(page, 4);
        if self.pages == 0 {
            let (at, timeline) = (self.next_page_at, self.timeline);
            let carry = std::mem::take(&mut self.resume)
                .into_iter()
                .find(|c| c.next_page_at == at && c.timeline == timeline);
            match carry {
                Some(carry) if continues => {
                    self.want = wanted(&carry.record);
                    self.record = carry.record;
                    self.resumed = true;
                }
                // What a record begun in the previous segment still holds.
                _ if continues => self.skip = align(u32_at(page, 16) as usize),
                _ => {}
            }
        } else if !continues && (self.skip > 0 || !self.record.is_empty()) {
            // The record in progress was cut short (by a crash before it was written whole,
            // `XLP_FIRST_IS_OVERWRITE_CONTRECORD`): this page starts with the next.
            self.skip = 0;
            self.record.clear();
            self.want = RECORD_HEADER;
            self.resumed = false;
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
            let wanted = wanted(&self.record);
            if self.want < wanted {
                self.want = wanted;
                continue;
            }
            if wanted > RECORD_HEADER {
                self.found
                    .extend(parse_create(&self.record).map(|created| CreatedTablespace {
                        continued: self.resumed,
                        ..created
                    }));
            }
            self.skip = align(total) - self.record.len();
            self.record.clear();
            self.want = RECORD_HEADER;
            self.resumed = false;
        }
    }

    pub fn finish(self) -> ScanEnd {
        let carry = (!self.done && !self.record.is_empty()).then_some(Carry {
            timeline: self.timeline,
            next_page_at: self.next_page_at,
            record: self.record,
        });
        ScanEnd {
            created: self.found,
            segment: self.pages > 0,
            carry,
        }
    }
}

/// How much of a record to read, given its start: the header, then all of a record that
/// creates a tablespace.
fn wanted(record: &[u8]) -> usize {
    if record.len() < RECORD_HEADER {
        return RECORD_HEADER;
    }
    let total = u32_at(record, 0) as usize;
    let creates = record[17] == RM_TBLSPC_ID
        && record[16] & 0xF0 == XLOG_TBLSPC_CREATE
        && total <= LARGEST_TABLESPACE_RECORD;
    if creates {
        total
    } else {
        RECORD_HEADER
    }
}

/// The tablespace OID and location in a whole `XLOG_TBLSPC_CREATE` record: its main data is
/// `xl_tblspc_create_rec` (the OID, then the path, ending in a zero byte).
fn parse_create(record: &[u8]) -> Option<CreatedTablespace> {
    let mut at = RECORD_HEADER;
    let (start, len) = loop {
        match *record.get(at)? {
            BLOCK_ID_DATA_SHORT => break (at + 2, usize::from(*record.get(at + 1)?)),
            BLOCK_ID_DATA_LONG => break (at + 5, u32_at(record.get(at..at + 5)?, 1) as usize),
            BLOCK_ID_ORIGIN => at += 3,
            BLOCK_ID_TOPLEVEL_XID => at += 5,
            _ => return None,
        }
    };
    let data = record.get(start..start.checked_add(len)?)?;
    let path = data.get(4..)?.split(|&b| b == 0).next()?;
    Some(CreatedTablespace {
        oid: u32_at(data, 0),
        location: String::from_utf8_lossy(path).into_owned(),
        continued: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 8192;
    const PAGES: usize = 8;
    const START: u64 = 0x0300_0000;
    /// The record bytes a segment's pages hold.
    const ROOM: usize = PAGES * PAGE - LONG_PAGE_HEADER - (PAGES - 1) * SHORT_PAGE_HEADER;

    /// A segment of `PAGES` pages at LSN `start` holding `stream` (record bytes, the first
    /// `rem` of them a record continued from the previous segment) across its pages, each
    /// page that starts inside a record marked as continuing it.
    fn segment_at(start: u64, stream: &[u8], rem: usize) -> Vec<u8> {
        let mut records = vec![(0, rem)];
        let mut at = align(rem);
        while at + 4 <= stream.len() {
            let total = u32_at(stream, at) as usize;
            if total == 0 {
                break;
            }
            records.push((at, at + total));
            at = align(at + total);
        }
        let mut out = Vec::new();
        let mut offset = 0;
        for i in 0..PAGES {
            let long = i == 0;
            let header = if long {
                LONG_PAGE_HEADER
            } else {
                SHORT_PAGE_HEADER
            };
            let left = match offset {
                0 => rem,
                _ => records
                    .iter()
                    .find(|&&(from, to)| from < offset && offset < to)
                    .map_or(0, |&(_, to)| to - offset),
            };
            let mut page = vec![0u8; PAGE];
            let mut info = if long { XLP_LONG_HEADER } else { 0 };
            if left > 0 {
                info |= XLP_FIRST_IS_CONTRECORD;
            }
            page[0..2].copy_from_slice(&0xD110u16.to_ne_bytes());
            page[2..4].copy_from_slice(&info.to_ne_bytes());
            page[4..8].copy_from_slice(&1u32.to_ne_bytes());
            page[8..16].copy_from_slice(&(start + (i * PAGE) as u64).to_ne_bytes());
            page[16..20].copy_from_slice(&(left as u32).to_ne_bytes());
            if long {
                page[32..36].copy_from_slice(&((PAGES * PAGE) as u32).to_ne_bytes());
                page[36..40].copy_from_slice(&(PAGE as u32).to_ne_bytes());
            }
            let rest = stream.get(offset..).unwrap_or_default();
            let n = (PAGE - header).min(rest.len());
            page[header..header + n].copy_from_slice(&rest[..n]);
            offset += PAGE - header;
            out.extend_from_slice(&page);
        }
        out
    }

    fn segment(stream: &[u8], rem: usize) -> Vec<u8> {
        segment_at(START, stream, rem)
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

    /// A record of another kind taking exactly `len` (a multiple of 8, at least 288) bytes.
    fn filler(len: usize) -> Vec<u8> {
        record(10, 0x00, &vec![3; len - RECORD_HEADER - 5])
    }

    fn create(oid: u32, path: &str) -> Vec<u8> {
        let mut main = oid.to_ne_bytes().to_vec();
        main.extend_from_slice(path.as_bytes());
        main.push(0);
        record(RM_TBLSPC_ID, XLOG_TBLSPC_CREATE, &main)
    }

    fn scan_from(scan: TablespaceScan, segment: &[u8], piece: usize) -> ScanEnd {
        let mut scan = scan;
        for p in segment.chunks(piece) {
            scan.feed(p);
        }
        scan.finish()
    }

    fn scan(segment: &[u8], piece: usize) -> Vec<CreatedTablespace> {
        scan_from(TablespaceScan::default(), segment, piece).created
    }

    fn found(oid: u32, path: &str) -> CreatedTablespace {
        CreatedTablespace {
            oid,
            location: path.into(),
            continued: false,
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
        stream.extend(filler(cut));
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
        // After a record of length zero nothing counts.
        let mut stream = record(10, 0x00, &[1; 50]);
        stream.extend(vec![0u8; 64]);
        stream.extend(create(16390, "/after/the/end"));
        assert_eq!(scan(&segment(&stream, 0), 4096), []);
        // Nor on a page left from another segment (the first is full to its end).
        let mut stream = filler(PAGE - LONG_PAGE_HEADER - 48);
        stream.extend(create(16390, "/srv/ts"));
        stream.extend(create(16391, "/old"));
        let mut seg = segment(&stream, 0);
        assert_eq!(scan(&seg, 4096).len(), 2);
        seg[PAGE + 8..PAGE + 16].copy_from_slice(&0u64.to_ne_bytes());
        assert_eq!(scan(&seg, 4096), [found(16390, "/srv/ts")]);
        // Not a segment at all.
        let end = scan_from(TablespaceScan::default(), &[0u8; PAGE], 4096);
        assert!(!end.segment && end.created.is_empty() && end.carry.is_none());
    }

    #[test]
    fn a_record_cut_short_is_dropped_at_the_next_page() {
        // A record that should run on into the second page, which does not continue it
        // but starts with a creation (as after a crash, XLP_FIRST_IS_OVERWRITE_CONTRECORD).
        let mut stream = filler(PAGE - LONG_PAGE_HEADER - 24);
        stream.extend(filler(600)[..24].iter());
        stream.extend(create(16393, "/srv/after"));
        let mut seg = segment(&stream, 0);
        assert_eq!(scan(&seg, 4096), []);
        seg[PAGE + 2..PAGE + 4].copy_from_slice(&0u16.to_ne_bytes());
        assert_eq!(scan(&seg, 4096), [found(16393, "/srv/after")]);
    }

    #[test]
    fn a_creation_the_segment_ends_in_is_completed_by_the_next() {
        let next = START + (PAGES * PAGE) as u64;
        let path = "/a/path/longer/than/what/fits";
        // The record's header whole, or cut, at the segment's end.
        for tail in [32, 16] {
            let whole = create(16392, path);
            let mut stream = filler(ROOM - tail);
            stream.extend(&whole[..tail]);
            let end = scan_from(TablespaceScan::default(), &segment(&stream, 0), 4096);
            assert!(end.segment && end.created.is_empty());
            let carry = end.carry.unwrap();
            assert_eq!((carry.timeline, carry.next_page_at), (1, next));

            let rest = &whole[tail..];
            let following = segment_at(next, rest, rest.len());
            // Among the records other segments ended in.
            let other = Carry {
                next_page_at: next + (PAGES * PAGE) as u64,
                ..carry.clone()
            };
            let resumed = TablespaceScan::continuing(vec![other, carry.clone()]);
            let end = scan_from(resumed, &following, 4096);
            let expected = CreatedTablespace {
                continued: true,
                ..found(16392, path)
            };
            assert_eq!(end.created, [expected], "{tail}");
            assert!(end.carry.is_none());
            // Another segment than the next, or another timeline, does not continue it: its
            // start is passed over as a record of the previous segment.
            let elsewhere = segment_at(next + (PAGES * PAGE) as u64, rest, rest.len());
            let end = scan_from(
                TablespaceScan::continuing(vec![carry.clone()]),
                &elsewhere,
                4096,
            );
            assert_eq!(end.created, []);
            let mut other_timeline = following.clone();
            other_timeline[4..8].copy_from_slice(&2u32.to_ne_bytes());
            let end = scan_from(
                TablespaceScan::continuing(vec![carry]),
                &other_timeline,
                4096,
            );
            assert_eq!(end.created, []);
        }
    }

    #[test]
    fn a_cut_header_of_another_record_is_completed_and_passed_over() {
        let next = START + (PAGES * PAGE) as u64;
        let other = filler(400);
        let mut stream = filler(ROOM - 16);
        stream.extend(&other[..16]);
        let carry = scan_from(TablespaceScan::default(), &segment(&stream, 0), 4096)
            .carry
            .unwrap();
        // The rest of that record, then a creation right after it.
        let mut rest = other[16..].to_vec();
        let continued = rest.len();
        rest.extend(create(16394, "/srv/next"));
        let following = segment_at(next, &rest, continued);
        let end = scan_from(TablespaceScan::continuing(vec![carry]), &following, 4096);
        assert_eq!(end.created, [found(16394, "/srv/next")]);
        // Without the carry, the same: the page says how much of a record it continues.
        assert_eq!(scan(&following, 4096), [found(16394, "/srv/next")]);
        // A whole header of another record is not carried.
        let mut stream = filler(ROOM - 40);
        stream.extend(&other[..40]);
        let end = scan_from(TablespaceScan::default(), &segment(&stream, 0), 4096);
        assert!(end.carry.is_none());
    }
}
