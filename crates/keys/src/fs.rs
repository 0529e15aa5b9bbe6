//! File-system helpers for the key directory: private modes, checks that refuse loose
//! permissions, and atomic writes (temp file, fsync, rename, fsync the directory).

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use crate::{KeyError, Result};

/// Suffix of in-flight writes; leftovers from a crash are removed on open.
pub(crate) const TMP_SUFFIX: &str = ".tmp";

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Create `dir` with mode 0700 if it is missing; refuse it if it is not a directory or
/// group/others have any access to it.
pub(crate) fn ensure_private_dir(dir: &Path) -> Result<()> {
    match fs::metadata(dir) {
        Ok(meta) => {
            if !meta.is_dir() {
                return Err(KeyError::NotADirectory(dir.to_path_buf()));
            }
            check_mode(dir, meta.permissions().mode(), "700")
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err(dir))?;
            // The umask can only remove bits, but set it explicitly so the result does
            // not depend on the umask at all.
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))
        }
        Err(e) => Err(io_err(dir)(e)),
    }
}

/// Refuse a key or metadata file that is not a regular file (a symlink, say) or that
/// group/others can access.
pub(crate) fn check_private_file(path: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(path).map_err(io_err(path))?;
    if !meta.file_type().is_file() {
        return Err(KeyError::NotAFile(path.to_path_buf()));
    }
    check_mode(path, meta.permissions().mode(), "600")
}

fn check_mode(path: &Path, mode: u32, wanted: &str) -> Result<()> {
    if mode & 0o077 != 0 {
        return Err(KeyError::InsecurePermissions {
            path: path.to_path_buf(),
            mode: mode & 0o7777,
            fix: format!("chmod {wanted} {}", path.display()),
        });
    }
    Ok(())
}

/// Write `bytes` to `dir/name` with mode 0600, atomically: a crash leaves either the old
/// file or the new one, never a torn one.
pub(crate) fn write_private_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let tmp = dir.join(format!(".{name}{TMP_SUFFIX}"));
    remove_if_present(&tmp)?;
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    file.write_all(bytes).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    drop(file);
    let dest = dir.join(name);
    fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
    sync_dir(dir)
}

/// Remove `path`; a missing file is not an error.
pub(crate) fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// fsync the directory so renames and removals in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// The names of the entries in `dir`.
pub(crate) fn list_dir(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        if let Some(name) = entry.file_name().to_str() {
            out.push((name.to_owned(), entry.path()));
        }
    }
    Ok(out)
}
