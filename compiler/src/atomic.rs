//! Atomic writes of user files: a temporary file in the same folder, written completely and
//! synced to disk, then renamed over the target, and the folder synced, so a reader sees the
//! old file or the new one, never a part (and a crash leaves one of the two).

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
    replace_with(path, |tmp| std::fs::write(tmp, bytes))
}

/// Writes `path` through `write` into a temporary file beside it, syncs it, renames it over
/// `path` and syncs the folder; removes the temporary file on any error.
pub fn replace_with(
    path: &Path,
    write: impl FnOnce(&Path) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    let tmp = temp_path(path)?;
    let result = write(&tmp)
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        anyhow::bail!("{}: cannot write: {e}", path.display());
    }
    sync_folder(path);
    Ok(())
}

/// Syncs the folder holding `path` so a rename in it is durable. Best effort: some file
/// systems do not sync folders.
pub fn sync_folder(path: &Path) {
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Ok(f) = std::fs::File::open(folder) {
        let _ = f.sync_all();
    }
}
