//! File paths as the index stores them: exact bytes, in a UTF-8 column.
//!
//! A path that is valid UTF-8 (nearly all) is stored as it is. Any other (Unix file names are
//! bytes) is stored as a NUL (which no Unix path contains, so the two forms never collide)
//! followed by the path with each byte that is not part of valid UTF-8 written `\xNN` and each
//! backslash written `\\`. [`decode`] gives the exact bytes back, to open the file; [`display`]
//! is what people and JSON see: the escaped text without the NUL (`/photos/bad\xff.png`).

use std::borrow::Cow;
use std::path::{Path, PathBuf};

const ESCAPED: char = '\0';

/// The stored form of `path`.
pub fn encode(path: &Path) -> String {
    if let Some(s) = path.to_str() {
        return s.to_string();
    }
    let mut out = String::from(ESCAPED);
    for chunk in path.as_os_str().as_encoded_bytes().utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' {
                out.push_str("\\\\");
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// The path a stored form names (the exact bytes [`encode`] was given, on Unix).
pub fn decode(stored: &str) -> PathBuf {
    let Some(escaped) = stored.strip_prefix(ESCAPED) else {
        return PathBuf::from(stored);
    };
    let mut bytes = Vec::with_capacity(escaped.len());
    let mut rest = escaped.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        match (b, tail) {
            (b'\\', [b'\\', more @ ..]) => {
                bytes.push(b'\\');
                rest = more;
            }
            (b'\\', [b'x', h, l, more @ ..]) => match hex(*h).zip(hex(*l)) {
                Some((h, l)) => {
                    bytes.push(h << 4 | l);
                    rest = more;
                }
                None => {
                    bytes.push(b);
                    rest = tail;
                }
            },
            _ => {
                bytes.push(b);
                rest = tail;
            }
        }
    }
    from_bytes(bytes)
}

/// What people see of a stored path: itself, or its escaped text for a non-UTF-8 one.
pub fn display(stored: &str) -> Cow<'_, str> {
    match stored.strip_prefix(ESCAPED) {
        Some(escaped) => Cow::Owned(escaped.to_string()),
        None => Cow::Borrowed(stored),
    }
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

#[cfg(unix)]
fn from_bytes(bytes: Vec<u8>) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(bytes))
}

#[cfg(not(unix))]
fn from_bytes(bytes: Vec<u8>) -> PathBuf {
    // Only Unix produces non-UTF-8 paths to escape.
    PathBuf::from(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_paths_are_stored_as_they_are() {
        for p in ["/photos/a.jpg", "/é/ß/猫.png", "/odd\\x41\\name.jpg", ""] {
            assert_eq!(encode(Path::new(p)), p);
            assert_eq!(decode(p), PathBuf::from(p));
            assert_eq!(display(p), p);
        }
    }

    #[cfg(unix)]
    #[test]
    fn other_bytes_round_trip_exactly() {
        use std::os::unix::ffi::OsStrExt;
        let cases: [&[u8]; 5] = [
            b"/photos/bad\xff\xfe.png",
            b"/a\\b/\xc3(\\x41.jpg",
            b"\x80",
            b"/trailing\\\xe2\x82",
            b"/\xed\xa0\x80surrogate",
        ];
        for bytes in cases {
            let p = Path::new(std::ffi::OsStr::from_bytes(bytes));
            let stored = encode(p);
            assert!(stored.starts_with('\0'), "{stored:?}");
            assert_eq!(decode(&stored).as_os_str().as_bytes(), bytes);
            assert!(!display(&stored).contains('\0'));
        }
        let shown = display(&encode(Path::new(std::ffi::OsStr::from_bytes(
            b"/photos/bad\xff\xfe.png",
        ))))
        .into_owned();
        assert_eq!(shown, "/photos/bad\\xff\\xfe.png");
    }
}
