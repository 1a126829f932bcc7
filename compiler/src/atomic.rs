//! Atomic writes of user files: a temporary file in the same folder, then a rename.

use anyhow::Context;
use std::path::{Path, PathBuf};

/// The temporary path beside `path`.
pub fn temp_path(path: &Path) -> anyhow::Result<PathBuf> {
    let name = path
        .file_name()
        .with_context(|| format!("{}: not a file path", path.display()))?
        .to_string_lossy()
        .to_string();
    Ok(path.with_file_name(format!(".{name}.{}.tmp", std::process::id())))
}

/// Writes `text` to `path` atomically.
pub fn write_text(path: &Path, text: &str) -> anyhow::Result<()> {
    write_bytes(path, text.as_bytes())
}

/// Writes `bytes` to `path` atomically.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = temp_path(path)?;
    std::fs::write(&tmp, bytes).with_context(|| format!("{}: cannot write", path.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow::anyhow!("{}: cannot write: {e}", path.display())
    })
}
