//! pg_dump's custom archive format: its table of contents (TOC), and its data blocks read
//! one after the other as they stream in.
//!
//! pg_dump writes the TOC before the data. When its output is a regular file it seeks back
//! at the end and writes every data block's offset into the TOC; drctl streams the dump
//! through a pipe, so the offsets stay unset.
//!
//! A restore reads the TOC with [`open`], then either streams the data blocks into the
//! database itself ([`Archive::next_block`], [`Archive::next_chunks`]), or, for what it does
//! not stream, writes the archive to a file for `pg_restore -j` ([`Archive::write_file`]).
//! That file gets the data offsets, without which `pg_restore -j` cannot size its jobs and
//! every worker finds its block by skipping through all the blocks before it; and each
//! block's small chunks are joined into chunks of up to [`JOINED_CHUNK`] bytes (uncompressed,
//! pg_dump writes every row as a chunk of its own, which pg_restore sends to the server as a
//! message of its own). The bytes pg_restore loads are unchanged: only where chunks start
//! changes.
//!
//! The layout follows PostgreSQL's `pg_backup_archiver.c` and `pg_backup_custom.c` (archive
//! versions 1.12 to 1.16, PostgreSQL 9.0 to 18). An archive with another version, another
//! format or compressed data is written to the file as it is.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufRead, BufWriter, Write};
use std::os::unix::fs::FileExt;

use crate::cancel::Cancel;
use crate::{Error, Result};

/// Offset flags (`K_OFFSET_*` in pg_dump).
const OFFSET_NOT_SET: u8 = 1;
const OFFSET_SET: u8 = 2;
const OFFSET_NO_DATA: u8 = 3;
/// Data block types (`BLK_*`).
pub const BLOCK_DATA: u8 = 1;
const BLOCK_BLOBS: u8 = 3;
/// The custom format's number (`archCustom`).
const FORMAT_CUSTOM: u8 = 1;

/// Chunks are joined up to this size.
pub const JOINED_CHUNK: usize = 256 << 10;

const fn version(major: u32, minor: u32) -> u32 {
    (major << 16) | (minor << 8)
}
const OLDEST: u32 = version(1, 12);
const NEWEST: u32 = version(1, 16);

/// One TOC entry, as far as a restore needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub dump_id: i64,
    /// What it is: `TABLE`, `TABLE DATA`, `INDEX`, `SEQUENCE SET`, `BLOBS`, ...
    pub desc: String,
    /// The section `pg_restore` counts it in: its own, or for an entry without one (a
    /// comment, a grant), that of the entry before it.
    pub section: Section,
    pub namespace: Option<String>,
    pub tag: String,
    /// The SQL that creates it, kept only for the entries that set up a session
    /// (`ENCODING`, `STDSTRINGS`, `SEARCHPATH`), the database's own (`DATABASE`: its
    /// `CREATE DATABASE`) and those about the database (see
    /// [`Entry::is_about_the_database`]).
    pub definition: Option<String>,
    /// The role that owns it, if any.
    pub owner: Option<String>,
    /// For table data: the `COPY ... FROM stdin;` statement its rows are for.
    pub copy: Option<String>,
    /// Where the entry's offset field is in the archive, and the flag it holds.
    slot_at: u64,
    flag: u8,
}

/// TOC sections (`teSection`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    PreData,
    Data,
    PostData,
}

impl Entry {
    /// Whether `pg_restore` applies it in its last pass, after everything else.
    pub fn is_grant(&self) -> bool {
        matches!(self.desc.as_str(), "ACL" | "DEFAULT ACL" | "ACL LANGUAGE")
    }

    /// Whether it is about the database rather than what is in it: its settings (`ALTER
    /// DATABASE ... SET`, `ALTER ROLE ... IN DATABASE ... SET`), comment, privileges and
    /// security labels, which `pg_restore` restores only with `--create`.
    pub fn is_about_the_database(&self) -> bool {
        self.desc == "DATABASE PROPERTIES"
            || (matches!(self.desc.as_str(), "COMMENT" | "ACL" | "SECURITY LABEL")
                && self.tag.starts_with("DATABASE "))
    }

    /// Whether the archive holds a data block for this entry.
    pub fn has_data(&self) -> bool {
        self.flag != OFFSET_NO_DATA
    }
}

/// Entries whose definition a session restoring data runs first.
pub const SESSION_SETUP: [&str; 3] = ["ENCODING", "STDSTRINGS", "SEARCHPATH"];

/// What [`Archive::write_file`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// Rewritten: this many data blocks, whose offsets are now in the TOC, and the chunks
    /// before and after joining.
    Rewritten {
        blocks: usize,
        chunks_in: u64,
        chunks_out: u64,
    },
    /// Copied as it is, for this reason.
    Copied(String),
}

/// An archive whose header and TOC have been read.
pub struct Archive<'a> {
    input: Input<'a>,
    /// The bytes of the header and the TOC.
    head: Vec<u8>,
    /// The TOC, or why this module does not read the archive's data.
    toc: std::result::Result<Vec<Entry>, String>,
}

/// Reads an archive's header and TOC from `input`. A read error is an error; an archive this
/// module does not read (another format or version, compressed data) is not, and says why.
pub fn open(input: &mut dyn BufRead) -> Result<Archive<'_>> {
    let mut input = Input {
        inner: input,
        taken: Some(Vec::new()),
        pos: 0,
        ints: 4,
        offsets: 8,
    };
    let toc = match input.toc() {
        Ok(entries) => Ok(entries),
        Err(Problem::Format(why)) => Err(why),
        Err(Problem::Read(e)) => return Err(read_error(e)),
    };
    let head = input.taken.take().unwrap_or_default();
    Ok(Archive { input, head, toc })
}

impl Archive<'_> {
    /// The TOC, or why the archive's data cannot be read here.
    pub fn toc(&self) -> std::result::Result<&[Entry], &str> {
        self.toc.as_deref().map_err(String::as_str)
    }

    /// Bytes read so far.
    pub fn position(&self) -> u64 {
        self.input.pos
    }

    /// The header and TOC as read: on their own, an archive `pg_restore` can restore
    /// everything but the data from.
    pub fn head(&self) -> &[u8] {
        &self.head
    }

    /// The next data block's type and entry ID, or None at the end of the archive.
    pub fn next_block(&mut self) -> Result<Option<(u8, i64)>> {
        self.input.next_block()
    }

    /// Appends the current data block's next chunks to `buf`, at least one and then more
    /// until it holds at least `limit` bytes; false once the block has ended (after
    /// appending the chunks before its end).
    pub fn next_chunks(&mut self, buf: &mut Vec<u8>, limit: usize) -> Result<bool> {
        let limit = limit.max(buf.len() + 1);
        loop {
            // pg_dump writes a chunk per row: those whole in the read buffer are taken
            // from it directly, the rest through the general path.
            if self.input.buffered_chunks(buf, limit)? {
                return Ok(false);
            }
            if buf.len() >= limit {
                return Ok(true);
            }
            let (at, len) = self.input.chunk_len()?;
            if len == 0 {
                return Ok(false);
            }
            self.input.append(buf, len).map_err(|p| p.into_error(at))?;
        }
    }

    /// Writes the whole archive to `out` (a new, empty file), rewritten as the module
    /// describes, or as it is if this module does not read it. A read error or damaged data
    /// is an error.
    pub fn write_file(self, out: &File, cancel: &Cancel) -> Result<Written> {
        let Archive {
            mut input,
            head,
            toc,
        } = self;
        let mut writer = Output {
            // Smaller than a joined chunk, so those go to the file without a copy.
            inner: BufWriter::with_capacity(JOINED_CHUNK / 4, out),
            pos: 0,
        };
        writer.put(&head)?;
        let entries = match toc {
            Ok(entries) => entries,
            Err(why) => {
                super::copy_cancellable(input.inner, &mut writer.inner, cancel)?;
                writer.finish()?;
                return Ok(Written::Copied(why));
            }
        };
        let ints = input.ints;
        let mut join = Joiner {
            buf: Vec::with_capacity(JOINED_CHUNK),
            chunks_in: 0,
            chunks_out: 0,
        };
        let mut starts: Vec<(i64, u64, u64)> = Vec::new();
        while let Some((kind, dump_id)) = input.next_block()? {
            cancel.check()?;
            let (start, read_at) = (writer.pos, input.pos);
            writer.put(&[kind])?;
            writer.int(dump_id, ints)?;
            if kind == BLOCK_DATA {
                join.block(&mut input, &mut writer, cancel)?;
            } else {
                loop {
                    let at = input.pos;
                    let oid = input.int().map_err(|p| p.into_error(at))?;
                    writer.int(oid, ints)?;
                    if oid == 0 {
                        break;
                    }
                    join.block(&mut input, &mut writer, cancel)?;
                }
            }
            starts.push((dump_id, start, read_at));
        }
        writer.finish()?;

        let by_id: HashMap<i64, &Entry> = entries.iter().map(|e| (e.dump_id, e)).collect();
        let mut patches = Vec::new();
        for (dump_id, start, read_at) in &starts {
            let entry = by_id.get(dump_id).ok_or_else(|| {
                damaged(
                    *read_at,
                    format!("data block of entry {dump_id}, which the TOC does not list"),
                )
            })?;
            if entry.flag == OFFSET_NO_DATA {
                return Err(damaged(
                    *read_at,
                    format!("data block of entry {dump_id}, which the TOC says has none"),
                ));
            }
            // The flag, then the offset least significant byte first, padded to the
            // archive's offset size (at least 8 bytes, checked with the header).
            let mut bytes = vec![OFFSET_SET];
            bytes.extend_from_slice(&start.to_le_bytes());
            bytes.resize(1 + input.offsets, 0);
            patches.push((entry.slot_at, bytes));
        }
        for (at, bytes) in &patches {
            out.write_all_at(bytes, *at)
                .map_err(|e| Error::io("write the dump's table of contents", e))?;
        }
        Ok(Written::Rewritten {
            blocks: starts.len(),
            chunks_in: join.chunks_in,
            chunks_out: join.chunks_out,
        })
    }
}

fn read_error(e: io::Error) -> Error {
    crate::pipeline::damaged("read the dump", e)
}

/// A `ReadInt` value from its bytes: a sign byte, then the value, least significant byte
/// first.
fn decode_int(bytes: &[u8]) -> i64 {
    let mut value: i64 = 0;
    for (i, b) in bytes[1..].iter().enumerate() {
        value |= i64::from(*b) << (8 * i);
    }
    if bytes[0] != 0 {
        -value
    } else {
        value
    }
}

/// An archive damaged at byte `at` of the dump.
pub fn damaged(at: u64, why: String) -> Error {
    Error::integrity(format!("PostgreSQL dump, data at byte {at}: {why}"))
}

enum Problem {
    Read(io::Error),
    /// Not an archive this module reads (in the TOC), or a damaged one (in the data).
    Format(String),
}

impl Problem {
    fn into_error(self, at: u64) -> Error {
        match self {
            Problem::Read(e) => read_error(e),
            Problem::Format(why) => damaged(at, why),
        }
    }
}

impl From<io::Error> for Problem {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Problem::Format("the archive ends early".into())
        } else {
            Problem::Read(e)
        }
    }
}

type Parsed<T> = std::result::Result<T, Problem>;

fn unsupported<T>(why: impl Into<String>) -> Parsed<T> {
    Err(Problem::Format(why.into()))
}

struct Input<'a> {
    inner: &'a mut dyn BufRead,
    /// The bytes read so far, while reading the header and TOC.
    taken: Option<Vec<u8>>,
    /// Bytes read so far.
    pos: u64,
    ints: usize,
    offsets: usize,
}

impl Input<'_> {
    fn exact(&mut self, buf: &mut [u8]) -> Parsed<()> {
        // Most reads (a chunk's length) lie within the reader's current chunk.
        let available = self.inner.fill_buf()?;
        if available.len() >= buf.len() {
            buf.copy_from_slice(&available[..buf.len()]);
            self.inner.consume(buf.len());
        } else {
            self.inner.read_exact(buf)?;
        }
        self.pos += buf.len() as u64;
        if let Some(taken) = &mut self.taken {
            taken.extend_from_slice(buf);
        }
        Ok(())
    }

    /// Appends the next `len` bytes to `buf`, straight from the read buffer.
    fn append(&mut self, buf: &mut Vec<u8>, mut len: usize) -> Parsed<()> {
        while len > 0 {
            let available = self.inner.fill_buf()?;
            if available.is_empty() {
                return unsupported("the archive ends early");
            }
            let n = available.len().min(len);
            buf.extend_from_slice(&available[..n]);
            if let Some(taken) = &mut self.taken {
                taken.extend_from_slice(&available[..n]);
            }
            self.inner.consume(n);
            self.pos += n as u64;
            len -= n;
        }
        Ok(())
    }

    /// Appends the chunks lying whole in the read buffer to `buf`, while it holds less
    /// than `limit` bytes; true if it reached the block's end. Only after the TOC, whose
    /// bytes are the only ones recorded.
    fn buffered_chunks(&mut self, buf: &mut Vec<u8>, limit: usize) -> Result<bool> {
        debug_assert!(self.taken.is_none(), "data read while recording the TOC");
        let header = 1 + self.ints;
        let available = self.inner.fill_buf().map_err(read_error)?;
        let mut used = 0;
        let mut ended = false;
        while buf.len() < limit && available.len() - used >= header {
            // A negative length is left to the general path, which reports it.
            let Ok(len) = usize::try_from(decode_int(&available[used..used + header])) else {
                break;
            };
            if len == 0 {
                used += header;
                ended = true;
                break;
            }
            if available.len() - used - header < len {
                break;
            }
            buf.extend_from_slice(&available[used + header..used + header + len]);
            used += header + len;
        }
        self.inner.consume(used);
        self.pos += used as u64;
        Ok(ended)
    }

    fn byte(&mut self) -> Parsed<u8> {
        let mut b = [0u8];
        self.exact(&mut b)?;
        Ok(b[0])
    }

    /// The next byte, or None at the end of the input.
    fn byte_or_end(&mut self) -> Parsed<Option<u8>> {
        let mut b = [0u8];
        loop {
            match self.inner.read(&mut b) {
                Ok(0) => return Ok(None),
                Ok(_) => {
                    self.pos += 1;
                    return Ok(Some(b[0]));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The next data block's type and entry ID, or None at the end of the archive.
    fn next_block(&mut self) -> Result<Option<(u8, i64)>> {
        let start = self.pos;
        let Some(kind) = self.byte_or_end().map_err(|p| p.into_error(start))? else {
            return Ok(None);
        };
        if !matches!(kind, BLOCK_DATA | BLOCK_BLOBS) {
            return Err(damaged(start, format!("unknown data block type {kind}")));
        }
        let dump_id = self.int().map_err(|p| p.into_error(start))?;
        Ok(Some((kind, dump_id)))
    }

    /// Where the next chunk starts and its length (0 at the end of a block).
    fn chunk_len(&mut self) -> Result<(u64, usize)> {
        let at = self.pos;
        let len = self.int().map_err(|p| p.into_error(at))?;
        let len = usize::try_from(len).map_err(|_| damaged(at, format!("chunk length {len}")))?;
        Ok((at, len))
    }

    /// `ReadInt`: a sign byte, then `ints` bytes, least significant first.
    fn int(&mut self) -> Parsed<i64> {
        let mut buf = [0u8; 9];
        let bytes = &mut buf[..=self.ints];
        self.exact(bytes)?;
        Ok(decode_int(bytes))
    }

    /// `ReadStr`: a length (negative for NULL), then the bytes.
    fn str(&mut self) -> Parsed<Option<Vec<u8>>> {
        let len = self.int()?;
        if len < 0 {
            return Ok(None);
        }
        let len = usize::try_from(len).or_else(|_| unsupported("string too long"))?;
        let mut buf = Vec::new();
        self.append(&mut buf, len)?;
        Ok(Some(buf))
    }

    /// `ReadStr` as text. Only a dump in UTF8 is streamed, where every string is valid
    /// UTF-8; in another encoding, what is not is replaced, and the text goes unused.
    fn text(&mut self) -> Parsed<Option<String>> {
        Ok(self
            .str()?
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned()))
    }

    /// Reads the header and the TOC.
    fn toc(&mut self) -> Parsed<Vec<Entry>> {
        let mut magic = [0u8; 5];
        self.exact(&mut magic)?;
        if &magic != b"PGDMP" {
            return unsupported("not a pg_dump custom-format archive");
        }
        let (major, minor, revision) = (self.byte()?, self.byte()?, self.byte()?);
        let v = version(major.into(), minor.into());
        if !(OLDEST..=NEWEST).contains(&v) {
            return unsupported(format!("archive version {major}.{minor}.{revision}"));
        }
        self.ints = self.byte()?.into();
        self.offsets = self.byte()?.into();
        // Offsets narrower than 64 bits (a 32-bit pg_dump) could not hold every position.
        if !(1..=8).contains(&self.ints) || !(8..=16).contains(&self.offsets) {
            return unsupported("unusual integer or offset size");
        }
        if self.byte()? != FORMAT_CUSTOM {
            return unsupported("not the custom format");
        }
        let compressed = if v >= version(1, 15) {
            self.byte()? != 0 // compression algorithm, 0 for none
        } else {
            self.int()? != 0 // zlib level
        };
        if compressed {
            return unsupported("compressed data");
        }
        for _ in 0..7 {
            self.int()?; // creation time
        }
        for _ in 0..3 {
            self.str()?; // database name, server and pg_dump versions
        }

        let count = self.int()?;
        let mut entries: Vec<Entry> = Vec::new();
        let mut seen = HashSet::new();
        for _ in 0..count {
            let dump_id = self.int()?;
            if dump_id <= 0 {
                return unsupported(format!("TOC entry ID {dump_id}"));
            }
            self.int()?; // had dumper
            self.str()?; // table OID
            self.str()?; // OID
            let tag = self.text()?.unwrap_or_default();
            let desc = self.text()?.unwrap_or_default();
            let section = match self.int()? {
                2 => Section::PreData,
                3 => Section::Data,
                4 => Section::PostData,
                _ => entries.last().map_or(Section::PreData, |e| e.section),
            };
            let definition = self.str()?;
            self.str()?; // drop statement
            let copy = self.text()?.filter(|c| !c.is_empty());
            let namespace = self.text()?;
            self.str()?; // tablespace
            if v >= version(1, 14) {
                self.str()?; // table access method
            }
            if v >= version(1, 16) {
                self.int()?; // relkind
            }
            let owner = self.text()?.filter(|o| !o.is_empty());
            self.str()?; // "with oids"
            while self.str()?.is_some() {} // dependencies, ended by NULL
            let slot_at = self.pos;
            let flag = self.byte()?;
            if !matches!(flag, OFFSET_NOT_SET | OFFSET_SET | OFFSET_NO_DATA) {
                return unsupported(format!("offset flag {flag} in TOC entry {dump_id}"));
            }
            for _ in 0..self.offsets {
                self.byte()?;
            }
            if !seen.insert(dump_id) {
                return unsupported(format!("TOC entry {dump_id} listed twice"));
            }
            let mut entry = Entry {
                dump_id,
                definition: None,
                owner,
                desc,
                section,
                namespace,
                tag,
                copy,
                slot_at,
                flag,
            };
            if SESSION_SETUP.contains(&entry.desc.as_str())
                || entry.desc == "DATABASE"
                || entry.is_about_the_database()
            {
                entry.definition = definition.map(|d| String::from_utf8_lossy(&d).into_owned());
            }
            entries.push(entry);
        }
        Ok(entries)
    }
}

/// The output file and how much has been written to it.
struct Output<'a> {
    inner: BufWriter<&'a File>,
    pos: u64,
}

impl Output<'_> {
    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.inner
            .write_all(bytes)
            .map_err(|e| Error::io("write the dump", e))?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// `WriteInt` with `ints` bytes.
    fn int(&mut self, value: i64, ints: usize) -> Result<()> {
        let mut buf = [0u8; 9];
        buf[0] = u8::from(value < 0);
        let le = value.unsigned_abs().to_le_bytes();
        buf[1..=ints].copy_from_slice(&le[..ints]);
        self.put(&buf[..=ints])
    }

    fn finish(&mut self) -> Result<()> {
        self.inner
            .flush()
            .map_err(|e| Error::io("write the dump", e))
    }
}

/// Joins the chunks of one block's data.
struct Joiner {
    buf: Vec<u8>,
    chunks_in: u64,
    chunks_out: u64,
}

impl Joiner {
    /// Copies length-prefixed chunks up to the zero length that ends them.
    /// Copies one data block's chunks, joined; stops if `cancel` is set meanwhile.
    fn block(
        &mut self,
        input: &mut Input<'_>,
        out: &mut Output<'_>,
        cancel: &Cancel,
    ) -> Result<()> {
        loop {
            let (at, len) = input.chunk_len()?;
            if len == 0 {
                break;
            }
            self.chunks_in += 1;
            if self.buf.len() + len > JOINED_CHUNK {
                cancel.check()?;
                self.flush(out, input.ints)?;
            }
            input
                .append(&mut self.buf, len)
                .map_err(|p| p.into_error(at))?;
        }
        self.flush(out, input.ints)?;
        out.int(0, input.ints)
    }

    fn flush(&mut self, out: &mut Output<'_>, ints: usize) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        out.int(self.buf.len() as i64, ints)?;
        out.put(&self.buf)?;
        self.buf.clear();
        self.chunks_out += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes pg_dump's integer and string encodings (4-byte ints, 8-byte offsets).
    #[derive(Default)]
    struct Archive(Vec<u8>);

    impl Archive {
        fn int(&mut self, v: i64) -> &mut Self {
            self.0.push(u8::from(v < 0));
            self.0
                .extend_from_slice(&(v.unsigned_abs() as u32).to_le_bytes());
            self
        }
        fn str(&mut self, s: Option<&str>) -> &mut Self {
            match s {
                None => self.int(-1),
                Some(s) => {
                    self.int(s.len() as i64);
                    self.0.extend_from_slice(s.as_bytes());
                    self
                }
            }
        }
        fn header(&mut self, compression: i64) -> &mut Self {
            self.0.extend_from_slice(b"PGDMP\x01\x0e\x00\x04\x08\x01");
            self.int(compression);
            for v in [1, 2, 3, 4, 5, 126, 0] {
                self.int(v);
            }
            self.str(Some("db")).str(Some("15.1")).str(Some("15.1"))
        }
        fn entry(&mut self, id: i64, flag: u8) -> &mut Self {
            self.int(id).int(1);
            for s in ["0", "0", "t", "TABLE DATA"] {
                self.str(Some(s));
            }
            self.int(3);
            for s in ["", "", "COPY t FROM stdin;\n", "public", ""] {
                self.str(Some(s));
            }
            self.str(Some("heap"))
                .str(Some("postgres"))
                .str(Some("false"))
                .str(Some("7"))
                .str(None);
            self.0.push(flag);
            self.0.extend_from_slice(&[0; 8]);
            self
        }
        fn chunks(&mut self, chunks: &[&[u8]]) -> &mut Self {
            for c in chunks {
                self.int(c.len() as i64);
                self.0.extend_from_slice(c);
            }
            self.int(0)
        }
        fn data(&mut self, id: i64, chunks: &[&[u8]]) -> &mut Self {
            self.0.push(BLOCK_DATA);
            self.int(id).chunks(chunks)
        }
        fn blobs(&mut self, id: i64, blobs: &[(i64, &[&[u8]])]) -> &mut Self {
            self.0.push(BLOCK_BLOBS);
            self.int(id);
            for (oid, chunks) in blobs {
                self.int(*oid).chunks(chunks);
            }
            self.int(0)
        }
    }

    fn rewrite(input: &[u8]) -> (Result<Written>, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.pgdump");
        let file = File::create_new(&path).unwrap();
        let mut reader = input;
        let written = open(&mut reader).and_then(|a| a.write_file(&file, &Cancel::new()));
        (written, std::fs::read(&path).unwrap())
    }

    /// Reads a rewritten archive back: each entry's offset flag, and each block's data (the
    /// chunks' bytes joined, per large object for blobs) found at its offset.
    fn read_back(archive: &[u8]) -> Vec<(i64, u8, Vec<Vec<u8>>, usize)> {
        let mut cursor = archive;
        let mut input = Input {
            inner: &mut cursor,
            taken: Some(Vec::new()),
            pos: 0,
            ints: 4,
            offsets: 8,
        };
        let mut entries = input.toc().ok().unwrap();
        entries.sort_by_key(|e| e.dump_id);
        let int = |at: &mut usize| {
            let v = u32::from_le_bytes(archive[*at + 1..*at + 5].try_into().unwrap()) as i64;
            *at += 5;
            v
        };
        let chunks = |at: &mut usize, count: &mut usize| {
            let mut data = Vec::new();
            loop {
                let len = int(at) as usize;
                if len == 0 {
                    return data;
                }
                *count += 1;
                data.extend_from_slice(&archive[*at..*at + len]);
                *at += len;
            }
        };
        let mut out = Vec::new();
        for Entry {
            dump_id: id,
            slot_at,
            ..
        } in entries
        {
            let flag = archive[slot_at as usize];
            let mut parts = Vec::new();
            let mut count = 0;
            if flag == OFFSET_SET {
                let offset = u64::from_le_bytes(
                    archive[slot_at as usize + 1..slot_at as usize + 9]
                        .try_into()
                        .unwrap(),
                );
                let mut at = offset as usize;
                let kind = archive[at];
                at += 1;
                assert_eq!(
                    int(&mut at),
                    id,
                    "the offset of entry {id} points at its block"
                );
                if kind == BLOCK_DATA {
                    parts.push(chunks(&mut at, &mut count));
                } else {
                    while int(&mut at) != 0 {
                        parts.push(chunks(&mut at, &mut count));
                    }
                }
            }
            out.push((id, flag, parts, count));
        }
        out
    }

    #[test]
    fn joins_chunks_and_records_the_offset_of_every_block() {
        let rows: Vec<Vec<u8>> = (0..5000)
            .map(|i| format!("{i}\trow {i}\n").into_bytes())
            .collect();
        let rows: Vec<&[u8]> = rows.iter().map(|r| r.as_slice()).collect();
        let big = vec![b'x'; JOINED_CHUNK + 10];
        let mut a = Archive::default();
        a.header(0);
        a.int(4)
            .entry(1, OFFSET_NOT_SET)
            .entry(2, OFFSET_NO_DATA)
            .entry(3, OFFSET_NOT_SET)
            .entry(4, OFFSET_NOT_SET);
        a.data(1, &rows)
            .data(3, &[b"a\n", &big, b"b\n"])
            .blobs(4, &[(16384, &[b"lo", b"one"]), (16385, &[b"two"])]);
        let (written, out) = rewrite(&a.0);
        assert!(
            matches!(
                written.unwrap(),
                Written::Rewritten {
                    blocks: 3,
                    chunks_in: 5006,
                    ..
                }
            ),
            "three blocks"
        );
        let back = read_back(&out);
        assert_eq!(back[0].0, 1);
        assert_eq!(back[0].1, OFFSET_SET);
        assert_eq!(back[0].2, vec![rows.concat()]);
        assert!(back[0].3 < 5, "5000 rows joined into {} chunks", back[0].3);
        assert_eq!((back[1].1, back[1].2.len()), (OFFSET_NO_DATA, 0));
        assert_eq!(back[2].2, vec![[&b"a\n"[..], &big, b"b\n"].concat()]);
        assert!(
            back[2].3 <= 3,
            "a chunk larger than the join size stays whole"
        );
        assert_eq!(back[3].2, vec![b"loone".to_vec(), b"two".to_vec()]);
    }

    #[test]
    fn data_chunks_are_read_whole_whatever_the_read_buffer_holds() {
        let rows: Vec<Vec<u8>> = (0..3000)
            .map(|i| format!("{i}\trow {i}\n").into_bytes())
            .collect();
        let mut chunks: Vec<&[u8]> = rows.iter().map(|r| r.as_slice()).collect();
        let big = vec![b'x'; 5000];
        chunks.insert(1000, &big);
        let mut a = Archive::default();
        a.header(0).int(1).entry(1, OFFSET_NOT_SET);
        a.data(1, &chunks);
        let mut truncated = a.0.clone();
        truncated.truncate(truncated.len() - 7);
        // Buffers smaller than a chunk's header, than a row, than the big row, and larger
        // than the whole archive.
        for capacity in [3, 37, 4096, 1 << 20] {
            let mut reader = io::BufReader::with_capacity(capacity, &a.0[..]);
            let mut archive = open(&mut reader).unwrap();
            assert_eq!(archive.next_block().unwrap(), Some((BLOCK_DATA, 1)));
            let (mut got, mut buf) = (Vec::new(), Vec::new());
            while archive.next_chunks(&mut buf, 1000).unwrap() {
                assert!(
                    buf.len() >= 1000,
                    "capacity {capacity}: {} bytes",
                    buf.len()
                );
                got.append(&mut buf);
            }
            got.append(&mut buf);
            assert_eq!(got, chunks.concat(), "capacity {capacity}");
            assert_eq!(archive.next_block().unwrap(), None);

            // A buffer already past the limit still takes a chunk: a long row grows.
            let mut reader = io::BufReader::with_capacity(capacity, &a.0[..]);
            let mut archive = open(&mut reader).unwrap();
            archive.next_block().unwrap();
            let mut buf = vec![b'.'; 2000];
            assert!(archive.next_chunks(&mut buf, 1000).unwrap());
            assert_eq!(&buf[2000..], chunks[0], "capacity {capacity}");

            let mut reader = io::BufReader::with_capacity(capacity, &truncated[..]);
            let mut archive = open(&mut reader).unwrap();
            archive.next_block().unwrap();
            let mut buf = Vec::new();
            let err = loop {
                match archive.next_chunks(&mut buf, 1000) {
                    Ok(true) => buf.clear(),
                    Ok(false) => panic!("capacity {capacity}: a truncated block ended"),
                    Err(e) => break e,
                }
            };
            assert_eq!(err.kind(), crate::ErrorKind::Integrity, "{err}");
        }
    }

    #[test]
    fn copies_archives_it_does_not_rewrite_as_they_are() {
        let mut compressed = Archive::default();
        compressed.header(6).int(1).entry(1, OFFSET_NOT_SET);
        compressed.data(1, &[b"\x78\x9c compressed"]);
        let mut newer = Archive::default();
        newer.header(0).int(1).entry(1, OFFSET_NOT_SET);
        newer.0[6] = 99;
        let cases = [
            ("plain SQL", b"--\n-- PostgreSQL database dump\n".to_vec()),
            ("compressed data", compressed.0),
            ("a newer archive version", newer.0),
        ];
        for (what, input) in cases {
            let (written, out) = rewrite(&input);
            assert!(
                matches!(written, Ok(Written::Copied(_))),
                "{what}: {written:?}"
            );
            assert_eq!(out, input, "{what}");
        }
    }

    #[test]
    fn damaged_data_is_an_error() {
        let mut truncated = Archive::default();
        truncated.header(0).int(1).entry(1, OFFSET_NOT_SET);
        truncated.data(1, &[b"row\n"]);
        truncated.0.truncate(truncated.0.len() - 3);
        let mut unknown = Archive::default();
        unknown.header(0).int(1).entry(1, OFFSET_NOT_SET);
        unknown.data(9, &[b"row\n"]);
        let mut kind = Archive::default();
        kind.header(0).int(1).entry(1, OFFSET_NOT_SET);
        kind.0.push(7);
        for (what, input) in [
            ("truncated data", truncated.0),
            ("a block for an unknown entry", unknown.0),
            ("an unknown block type", kind.0),
        ] {
            let (written, _) = rewrite(&input);
            let err = written.expect_err(what);
            assert_eq!(err.kind(), crate::ErrorKind::Integrity, "{what}: {err}");
        }
    }
}
