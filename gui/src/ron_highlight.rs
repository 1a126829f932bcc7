//! Token classes of RON text for the editor's colouring.

/// What a span of text is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    Comment,
    String,
    Number,
    /// A struct or variant name (capitalised identifier).
    TypeName,
    /// A field name (identifier followed by `:`).
    Field,
    Ident,
    Punct,
    Space,
}

/// Splits `text` into spans covering it exactly, in order.
pub fn tokenize(text: &str) -> Vec<(std::ops::Range<usize>, TokenKind)> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        let c = bytes[i];
        let kind = if c == b'/' && bytes.get(i + 1) == Some(&b'/') {
            while i < bytes.len() && bytes[i] != b'\n' {
                i += 1;
            }
            TokenKind::Comment
        } else if c == b'/' && bytes.get(i + 1) == Some(&b'*') {
            i += 2;
            while i < bytes.len() && !(bytes[i] == b'*' && bytes.get(i + 1) == Some(&b'/')) {
                i += 1;
            }
            i = (i + 2).min(bytes.len());
            TokenKind::Comment
        } else if c == b'"' {
            i += 1;
            while i < bytes.len() && bytes[i] != b'"' {
                if bytes[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i = (i + 1).min(bytes.len());
            TokenKind::String
        } else if c.is_ascii_digit()
            || (c == b'-' && bytes.get(i + 1).is_some_and(u8::is_ascii_digit))
        {
            i += 1;
            while i < bytes.len()
                && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'.' || bytes[i] == b'_')
            {
                i += 1;
            }
            TokenKind::Number
        } else if c.is_ascii_alphabetic() || c == b'_' {
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            let mut j = i;
            while j < bytes.len() && (bytes[j] == b' ' || bytes[j] == b'\t') {
                j += 1;
            }
            if bytes.get(j) == Some(&b':') {
                TokenKind::Field
            } else if c.is_ascii_uppercase() {
                TokenKind::TypeName
            } else {
                TokenKind::Ident
            }
        } else if c.is_ascii_whitespace() {
            while i < bytes.len() && bytes[i].is_ascii_whitespace() {
                i += 1;
            }
            TokenKind::Space
        } else {
            // One character (multi-byte characters whole).
            i += text[i..].chars().next().map_or(1, char::len_utf8);
            TokenKind::Punct
        };
        // Never split a multi-byte character.
        while i < bytes.len() && !text.is_char_boundary(i) {
            i += 1;
        }
        out.push((start..i, kind));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(text: &str) -> Vec<(&str, TokenKind)> {
        tokenize(text)
            .into_iter()
            .filter(|(_, k)| *k != TokenKind::Space)
            .map(|(r, k)| (&text[r], k))
            .collect()
    }

    #[test]
    fn classes() {
        use TokenKind::*;
        assert_eq!(
            kinds("Pipeline(keep: 3, // hi\n dtype: F32, m: \"a\\\"b\", x: -1.5e3, y: true)"),
            vec![
                ("Pipeline", TypeName),
                ("(", Punct),
                ("keep", Field),
                (":", Punct),
                ("3", Number),
                (",", Punct),
                ("// hi", Comment),
                ("dtype", Field),
                (":", Punct),
                ("F32", TypeName),
                (",", Punct),
                ("m", Field),
                (":", Punct),
                ("\"a\\\"b\"", String),
                (",", Punct),
                ("x", Field),
                (":", Punct),
                ("-1.5e3", Number),
                (",", Punct),
                ("y", Field),
                (":", Punct),
                ("true", Ident),
                (")", Punct),
            ]
        );
    }

    #[test]
    fn spans_cover_any_text() {
        for t in ["", "\"unterminated", "/* open", "é€ x", "a/", "\"\\"] {
            let spans = tokenize(t);
            let mut at = 0;
            for (r, _) in &spans {
                assert_eq!(r.start, at);
                at = r.end;
            }
            assert_eq!(at, t.len(), "{t:?}");
        }
    }
}
