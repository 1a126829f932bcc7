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

/// Streams records to a file without holding them.
pub struct TraceWriter {
    out: BufWriter<std::fs::File>,
    tmp: PathBuf,
    path: PathBuf,
    pub records: u64,
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
        })
    }

    pub fn write(&mut self, r: &TraceRecord) -> anyhow::Result<()> {
        serde_json::to_writer(&mut self.out, r)?;
        self.out.write_all(b"\n")?;
        self.records += 1;
        Ok(())
    }

    /// Flushes and moves the file into place.
    pub fn finish(mut self) -> anyhow::Result<PathBuf> {
        self.out.flush()?;
        std::fs::rename(&self.tmp, &self.path)
            .map_err(|e| anyhow::anyhow!("{}: cannot write: {e}", self.path.display()))?;
        Ok(self.path)
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
