//! Streaming snapshot export and import of the state machine.
//!
//! A snapshot is every row of the `kv`, `rev` and `meta` column families read from one RocksDB
//! snapshot, written as frames, so neither side ever holds the store in memory:
//!
//! ```text
//! "FLOSNAP1"
//! frame*      = cf(u8: 1 kv, 2 rev, 3 meta) le32(key len) le32(value len) key value
//! trailer     = 0xFF le64(frame count) le32(crc32 of every frame byte)
//! ```
//!
//! Import checks the magic, every frame and the trailer; a truncated or damaged stream is an
//! error and the caller discards the half-built generation.

use std::io::{self, Read, Write};

use rocksdb::{ReadOptions, WriteBatch, WriteOptions};

use crate::error::{Error, Result};
use crate::keys::{self, meta};
use crate::kv::Generation;

const MAGIC: &[u8; 8] = b"FLOSNAP1";
const TRAILER: u8 = 0xFF;
const CFS: [(u8, &str); 3] = [(1, "kv"), (2, "rev"), (3, "meta")];
/// Flush an import batch once it holds this many bytes.
const IMPORT_BATCH_BYTES: usize = 4 << 20;
/// Largest frame accepted on import (keys and values are far smaller).
const MAX_FRAME_BYTES: usize = 64 << 20;

/// What a snapshot holds, besides the data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportInfo {
    /// The applied log id recorded in it (opaque).
    pub applied: Option<Vec<u8>>,
    /// The membership recorded in it (opaque).
    pub membership: Option<Vec<u8>>,
    /// Its revision.
    pub revision: i64,
    /// Rows it holds.
    pub rows: u64,
}

struct CrcWriter<'a> {
    out: &'a mut dyn Write,
    crc: crc32fast::Hasher,
}

impl Write for CrcWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

pub(crate) fn export(gen: &Generation, out: &mut dyn Write) -> Result<ExportInfo> {
    let snap = gen.db.snapshot();
    let mut info = ExportInfo::default();
    out.write_all(MAGIC)?;
    let mut w = CrcWriter {
        out,
        crc: crc32fast::Hasher::new(),
    };
    for (tag, name) in CFS {
        let mut ro = ReadOptions::default();
        ro.set_snapshot(&snap);
        ro.fill_cache(false);
        let mut it = gen.db.raw_iterator_cf_opt(gen.cf(name), ro);
        it.seek_to_first();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if tag == 3 {
                match k {
                    meta::APPLIED => info.applied = Some(v.to_vec()),
                    meta::MEMBERSHIP => info.membership = Some(v.to_vec()),
                    meta::REVISION => info.revision = keys::decode_i64(v)?,
                    _ => {}
                }
            }
            w.write_all(&[tag])?;
            w.write_all(&(k.len() as u32).to_le_bytes())?;
            w.write_all(&(v.len() as u32).to_le_bytes())?;
            w.write_all(k)?;
            w.write_all(v)?;
            info.rows += 1;
            it.next();
        }
        it.status()?;
    }
    let crc = w.crc.finalize();
    let out = w.out;
    out.write_all(&[TRAILER])?;
    out.write_all(&info.rows.to_le_bytes())?;
    out.write_all(&crc.to_le_bytes())?;
    out.flush()?;
    Ok(info)
}

fn read_exact_or_corrupt(input: &mut dyn Read, buf: &mut [u8], what: &str) -> Result<()> {
    input.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => Error::Corrupt(format!("snapshot ends inside {what}")),
        _ => Error::Io(e),
    })
}

pub(crate) fn import(gen: &Generation, input: &mut dyn Read) -> Result<ExportInfo> {
    let mut batch = WriteBatch::default();
    let mut wo = WriteOptions::default();
    // The generation is flushed and synced before it becomes current, so the WAL adds nothing.
    wo.disable_wal(true);
    let info = read_frames(input, &mut |name, k, v| {
        batch.put_cf(gen.cf(name), k, v);
        if batch.size_in_bytes() >= IMPORT_BATCH_BYTES {
            gen.db.write_opt(std::mem::take(&mut batch), &wo)?;
        }
        Ok(())
    })?;
    gen.db.write_opt(batch, &wo)?;
    Ok(info)
}

/// Checks a snapshot stream (magic, every frame, the checksum) without storing it.
pub fn verify(input: &mut dyn Read) -> Result<ExportInfo> {
    read_frames(input, &mut |_, _, _| Ok(()))
}

/// Receives each row of a snapshot: column family, key, value.
type RowSink<'a> = dyn FnMut(&'static str, &[u8], &[u8]) -> Result<()> + 'a;

/// Parses a snapshot stream, handing each row to `sink`.
fn read_frames(input: &mut dyn Read, sink: &mut RowSink<'_>) -> Result<ExportInfo> {
    let mut magic = [0u8; 8];
    read_exact_or_corrupt(input, &mut magic, "the header")?;
    if &magic != MAGIC {
        return Err(Error::Corrupt("not a Flotilla store snapshot".into()));
    }
    let mut info = ExportInfo::default();
    let mut crc = crc32fast::Hasher::new();
    let mut buf = Vec::new();
    loop {
        let mut tag = [0u8; 1];
        read_exact_or_corrupt(input, &mut tag, "a frame")?;
        if tag[0] == TRAILER {
            let mut rest = [0u8; 12];
            read_exact_or_corrupt(input, &mut rest, "the trailer")?;
            let rows = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
            let want = u32::from_le_bytes(rest[8..].try_into().expect("4 bytes"));
            if rows != info.rows || want != crc.finalize() {
                return Err(Error::Corrupt(format!(
                    "snapshot checksum mismatch ({} rows read, trailer says {rows})",
                    info.rows
                )));
            }
            break;
        }
        let name = CFS
            .iter()
            .find(|(t, _)| *t == tag[0])
            .map(|(_, n)| *n)
            .ok_or_else(|| Error::Corrupt(format!("unknown snapshot frame tag {}", tag[0])))?;
        let mut lens = [0u8; 8];
        read_exact_or_corrupt(input, &mut lens, "a frame header")?;
        let klen = u32::from_le_bytes(lens[..4].try_into().expect("4 bytes")) as usize;
        let vlen = u32::from_le_bytes(lens[4..].try_into().expect("4 bytes")) as usize;
        if klen + vlen > MAX_FRAME_BYTES {
            return Err(Error::Corrupt(format!(
                "snapshot frame of {} bytes",
                klen + vlen
            )));
        }
        buf.resize(klen + vlen, 0);
        read_exact_or_corrupt(input, &mut buf, "a frame body")?;
        crc.update(&tag);
        crc.update(&lens);
        crc.update(&buf);
        let (k, v) = buf.split_at(klen);
        if name == "meta" {
            match k {
                meta::APPLIED => info.applied = Some(v.to_vec()),
                meta::MEMBERSHIP => info.membership = Some(v.to_vec()),
                meta::REVISION => info.revision = keys::decode_i64(v)?,
                _ => {}
            }
        }
        sink(name, k, v)?;
        info.rows += 1;
    }
    Ok(info)
}
