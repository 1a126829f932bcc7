//! Traces: one JSON object per generated token, one per line (JSON Lines), streamed to disk.
//!
//! Each record: `seq` (request id), `pos` (position of the token in its sequence), `token`,
//! `step` (scheduler iteration), `t_s` (clock time the token was produced, seconds),
//! `batch` (sequences in that step), `stages` (graph stages run, in order), `layers` (the
//! transformer layers run, 0-based), `exit_layer` (the exit point whose output produced the
//! token, counted in layers run: `L` for the full model of `L` layers, `4` for a head after
//! the fourth layer), `signals` (per exit point evaluated, in order: its layer count, the
//! exit rule's signal value there and the head's token; empty without exit heads). The file
//! is written to a temporary name and renamed when the run ends.

use serde::{Deserialize, Serialize};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceRecord {
    pub seq: usize,
    pub pos: usize,
    /// The token id; `null` from the simulated executor, which runs no model.
    pub token: Option<u32>,
    pub step: u64,
    pub t_s: f64,
    pub batch: usize,
    pub stages: Vec<String>,
    pub layers: Vec<usize>,
    pub exit_layer: usize,
    #[serde(default)]
    pub signals: Vec<LayerSignal>,
    /// Under self-speculative decoding: a kept draft, or the full model's token after a
    /// rejected draft or after every draft.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speculated: Option<crate::metrics::Speculated>,
}

/// What an exit point saw for one token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerSignal {
    /// The exit point: hidden state after this many layers.
    pub layer: usize,
    /// The exit rule's signal there (confidence, margin, entropy, cosine or gate
    /// probability, by rule); higher means readier to exit except for entropy.
    pub value: f64,
    /// The head's top token there (`null` from the simulated executor).
    pub token: Option<u32>,
}

/// Streams records to a file without holding them. Records go to a temporary file beside
/// the target, moved into place by [`TraceWriter::finish`]; a writer dropped unfinished (a
/// failed run) removes it, so no partial trace is left behind or replaces an older one.
pub struct TraceWriter {
    out: BufWriter<std::fs::File>,
    tmp: PathBuf,
    path: PathBuf,
    pub records: u64,
    finished: bool,
}

impl TraceWriter {
    pub fn create(path: &Path) -> anyhow::Result<Self> {
        let tmp = exitgraph_compiler::atomic::temp_path(path)?;
        let file = std::fs::File::create(&tmp)
            .map_err(|e| anyhow::anyhow!("{}: cannot write: {e}", path.display()))?;
        Ok(TraceWriter {
            out: BufWriter::new(file),
            tmp,
            path: path.to_path_buf(),
            records: 0,
            finished: false,
        })
    }

    pub fn write(&mut self, r: &TraceRecord) -> anyhow::Result<()> {
        serde_json::to_writer(&mut self.out, r)?;
        self.out.write_all(b"\n")?;
        self.records += 1;
        Ok(())
    }

    /// Flushes, syncs and moves the file into place.
    pub fn finish(mut self) -> anyhow::Result<PathBuf> {
        let path = self.path.clone();
        let wrap = |e: std::io::Error| anyhow::anyhow!("{}: cannot write: {e}", path.display());
        self.out.flush().map_err(wrap)?;
        self.out.get_ref().sync_all().map_err(wrap)?;
        std::fs::rename(&self.tmp, &self.path).map_err(wrap)?;
        self.finished = true;
        exitgraph_compiler::atomic::sync_folder(&self.path);
        Ok(self.path.clone())
    }
}

impl Drop for TraceWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Reads a trace file record by record.
pub fn read_trace(
    path: &Path,
) -> anyhow::Result<impl Iterator<Item = anyhow::Result<TraceRecord>>> {
    use std::io::BufRead;
    let file = std::fs::File::open(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let path = path.to_path_buf();
    Ok(std::io::BufReader::new(file)
        .lines()
        .enumerate()
        .map(move |(i, line)| {
            let line = line.map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            serde_json::from_str(&line)
                .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1))
        }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn record(seq: usize) -> TraceRecord {
        TraceRecord {
            speculated: None,
            seq,
            pos: 3,
            token: Some(7),
            step: 1,
            t_s: 0.5,
            batch: 1,
            stages: vec!["layers 0..2".into()],
            layers: vec![0, 1],
            exit_layer: 2,
            signals: Vec::new(),
        }
    }

    #[test]
    fn an_unfinished_trace_leaves_nothing_and_a_finished_one_replaces_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace.jsonl");
        std::fs::write(&path, "older trace\n").unwrap();
        let mut w = TraceWriter::create(&path).unwrap();
        w.write(&record(0)).unwrap();
        drop(w);
        // The failed run left no temporary file and did not touch the older trace.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("trace.jsonl")]);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "older trace\n");
        let mut w = TraceWriter::create(&path).unwrap();
        w.write(&record(0)).unwrap();
        w.write(&record(1)).unwrap();
        w.finish().unwrap();
        let back: Vec<TraceRecord> = read_trace(&path).unwrap().map(|r| r.unwrap()).collect();
        assert_eq!(back, vec![record(0), record(1)]);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
