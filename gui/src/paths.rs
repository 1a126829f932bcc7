//! Paths as the explorer shows them: `..` resolved, relative to the working folder when
//! that is shorter.

use std::path::{Component, Path, PathBuf};

/// `path` with `.` and `a/..` pairs removed, without touching the file system.
pub fn normalize(path: &Path) -> PathBuf {
    let mut out: Vec<Component> = Vec::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => match out.last() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                Some(Component::RootDir | Component::Prefix(_)) => {}
                _ => out.push(c),
            },
            other => out.push(other),
        }
    }
    if out.is_empty() {
        return PathBuf::from(".");
    }
    out.iter().collect()
}

/// `path` relative to `base` (both absolute), with at most two `..`; `None` otherwise.
pub fn relative_to(path: &Path, base: &Path) -> Option<PathBuf> {
    let (p, b) = (normalize(path), normalize(base));
    if !p.is_absolute() || !b.is_absolute() {
        return None;
    }
    let pc: Vec<Component> = p.components().collect();
    let bc: Vec<Component> = b.components().collect();
    let common = pc.iter().zip(&bc).take_while(|(x, y)| x == y).count();
    let ups = bc.len() - common;
    if common <= 1 || ups > 2 {
        return None;
    }
    let mut out = PathBuf::new();
    for _ in 0..ups {
        out.push("..");
    }
    for c in &pc[common..] {
        out.push(c.as_os_str());
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    Some(out)
}

/// The path to show and use: relative to the working folder when close to it.
pub fn friendly(path: &Path) -> PathBuf {
    let abs = normalize(path);
    std::env::current_dir()
        .ok()
        .and_then(|cwd| relative_to(&abs, &cwd))
        .unwrap_or(abs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizing() {
        assert_eq!(
            normalize(Path::new("/a/b/../c/./d")),
            PathBuf::from("/a/c/d")
        );
        assert_eq!(normalize(Path::new("../x")), PathBuf::from("../x"));
        assert_eq!(normalize(Path::new("/..")), PathBuf::from("/"));
        assert_eq!(normalize(Path::new("a/..")), PathBuf::from("."));
    }

    #[test]
    fn relative_paths() {
        let r = |p: &str, b: &str| relative_to(Path::new(p), Path::new(b));
        assert_eq!(
            r("/r/examples/demo.ron", "/r"),
            Some("examples/demo.ron".into())
        );
        assert_eq!(
            r("/r/gui/../examples/d.ron", "/r/gui"),
            Some("../examples/d.ron".into())
        );
        assert_eq!(r("/r", "/r"), Some(".".into()));
        assert_eq!(r("/x/y", "/a/b/c/d"), None);
        assert_eq!(r("rel", "/a"), None);
    }
}
