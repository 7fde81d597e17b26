//! PostgreSQL's array literal (`array_out`'s text), parsed without trusting it.
//!
//! `{1,2,NULL}`, `{"a b","c\"d",NULL,"NULL"}`, `{{1,2},{3,4}}`, `[0:1]={1,2}`, `{}`. An unquoted
//! `NULL` (any case) is SQL NULL; a quoted `"NULL"` is the four-letter string.

/// One element of a parsed array: SQL NULL, an element's text, or a sub-array (a further dimension).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArrayElem {
    Null,
    Value(String),
    Array(Vec<ArrayElem>),
}

/// PostgreSQL's MAXDIM: no array value has more dimensions, so deeper nesting is malformed input
/// (and the limit keeps the recursion bounded).
const MAX_DIMS: usize = 6;

/// Parses an array literal into its top-level elements. `delim` is the element type's delimiter
/// (`,` for every builtin but box). The error says what is wrong, for [`super::TypeError`].
pub fn parse_array(text: &str, delim: char) -> Result<Vec<ArrayElem>, String> {
    let mut p = Parser {
        chars: text.char_indices().peekable(),
        delim,
    };
    p.skip_ws();
    // Non-default lower bounds come first: `[0:1]={1,2}`, `[1:2][1:1]={{a},{b}}`.
    if p.peek() == Some('[') {
        while p.peek() == Some('[') {
            p.next();
            loop {
                match p.next() {
                    Some(']') => break,
                    Some(c) if c.is_ascii_digit() || c == ':' || c == '-' || c == '+' => {}
                    _ => return Err("malformed dimension bounds".into()),
                }
            }
        }
        if p.next() != Some('=') {
            return Err("dimension bounds not followed by '='".into());
        }
        p.skip_ws();
    }
    if p.next() != Some('{') {
        return Err("array literal does not start with '{'".into());
    }
    let elems = p.items(1)?;
    p.skip_ws();
    match p.next() {
        None => Ok(elems),
        Some(_) => Err("text after the closing '}'".into()),
    }
}

/// PostgreSQL's `array_isspace`: ASCII whitespace only (a no-break space is element text).
fn pg_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c')
}

struct Parser<'a> {
    chars: std::iter::Peekable<std::str::CharIndices<'a>>,
    delim: char,
}

impl Parser<'_> {
    fn peek(&mut self) -> Option<char> {
        self.chars.peek().map(|&(_, c)| c)
    }

    fn next(&mut self) -> Option<char> {
        self.chars.next().map(|(_, c)| c)
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(pg_space) {
            self.next();
        }
    }

    /// The items of one `{…}` level; the opening brace is already consumed.
    fn items(&mut self, depth: usize) -> Result<Vec<ArrayElem>, String> {
        if depth > MAX_DIMS {
            return Err(format!("more than {MAX_DIMS} dimensions"));
        }
        let mut out = Vec::new();
        self.skip_ws();
        if self.peek() == Some('}') {
            self.next();
            return Ok(out);
        }
        loop {
            self.skip_ws();
            let item = match self.peek() {
                Some('{') => {
                    self.next();
                    ArrayElem::Array(self.items(depth + 1)?)
                }
                Some('"') => {
                    self.next();
                    ArrayElem::Value(self.quoted()?)
                }
                Some(_) => self.unquoted()?,
                None => return Err("unterminated array".into()),
            };
            out.push(item);
            self.skip_ws();
            match self.next() {
                Some('}') => return Ok(out),
                Some(c) if c == self.delim => {}
                Some(c) => return Err(format!("unexpected {c:?} after an element")),
                None => return Err("unterminated array".into()),
            }
        }
    }

    /// A `"…"` element; the opening quote is consumed. Backslash escapes the next character.
    fn quoted(&mut self) -> Result<String, String> {
        let mut s = String::new();
        loop {
            match self.next() {
                Some('"') => return Ok(s),
                Some('\\') => match self.next() {
                    Some(c) => s.push(c),
                    None => return Err("unterminated escape".into()),
                },
                Some(c) => s.push(c),
                None => return Err("unterminated quoted element".into()),
            }
        }
    }

    /// An unquoted element: up to the delimiter or `}`, surrounding whitespace dropped, backslash
    /// escapes honoured (an escaped character is kept even if it is whitespace at an end).
    fn unquoted(&mut self) -> Result<ArrayElem, String> {
        let mut s = String::new();
        let mut kept_len = 0; // length up to the last escaped or non-whitespace character
        let mut escaped_any = false;
        loop {
            match self.peek() {
                Some(c) if c == self.delim || c == '}' => break,
                Some('{') | Some('"') => {
                    return Err("unexpected '{' or '\"' inside an element".into())
                }
                Some('\\') => {
                    self.next();
                    match self.next() {
                        Some(c) => s.push(c),
                        None => return Err("unterminated escape".into()),
                    }
                    escaped_any = true;
                    kept_len = s.len();
                }
                Some(c) => {
                    self.next();
                    s.push(c);
                    if !pg_space(c) {
                        kept_len = s.len();
                    }
                }
                None => return Err("unterminated array".into()),
            }
        }
        s.truncate(kept_len);
        if s.is_empty() && !escaped_any {
            return Err("empty unquoted element".into());
        }
        if !escaped_any && s.eq_ignore_ascii_case("NULL") {
            return Ok(ArrayElem::Null);
        }
        Ok(ArrayElem::Value(s))
    }
}

/// Writes elements as PostgreSQL's `array_out` would (quoting what needs it): the inverse of
/// [`parse_array`], for tests and for building literals.
pub fn format_array(elems: &[ArrayElem], delim: char) -> String {
    let mut out = String::from("{");
    for (i, e) in elems.iter().enumerate() {
        if i > 0 {
            out.push(delim);
        }
        match e {
            ArrayElem::Null => out.push_str("NULL"),
            ArrayElem::Array(inner) => out.push_str(&format_array(inner, delim)),
            ArrayElem::Value(v) => {
                let needs_quotes = v.is_empty()
                    || v.eq_ignore_ascii_case("NULL")
                    || v.chars()
                        .any(|c| c == delim || matches!(c, '{' | '}' | '"' | '\\') || pg_space(c));
                if needs_quotes {
                    out.push('"');
                    for c in v.chars() {
                        if c == '"' || c == '\\' {
                            out.push('\\');
                        }
                        out.push(c);
                    }
                    out.push('"');
                } else {
                    out.push_str(v);
                }
            }
        }
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::ArrayElem::{Array, Null, Value};
    use super::*;
    use proptest::prelude::*;

    fn v(s: &str) -> ArrayElem {
        Value(s.to_owned())
    }

    #[test]
    fn plain_null_quoted_nested_bounds_empty() {
        assert_eq!(
            parse_array("{1,2,NULL}", ','),
            Ok(vec![v("1"), v("2"), Null])
        );
        assert_eq!(
            parse_array(r#"{"a b","c\"d",NULL,"NULL",null,"back\\slash"}"#, ','),
            Ok(vec![
                v("a b"),
                v("c\"d"),
                Null,
                v("NULL"),
                Null,
                v("back\\slash")
            ])
        );
        assert_eq!(
            parse_array("{{1,2},{3,4}}", ','),
            Ok(vec![
                Array(vec![v("1"), v("2")]),
                Array(vec![v("3"), v("4")])
            ])
        );
        assert_eq!(parse_array("[0:1]={1,2}", ','), Ok(vec![v("1"), v("2")]));
        assert_eq!(
            parse_array("[-1:0][1:1]={{a},{b}}", ','),
            Ok(vec![Array(vec![v("a")]), Array(vec![v("b")])])
        );
        assert_eq!(parse_array("{}", ','), Ok(vec![]));
        assert_eq!(parse_array("{ a , b c }", ','), Ok(vec![v("a"), v("b c")]));
        assert_eq!(
            parse_array(r"{a\,b,\ x\ }", ','),
            Ok(vec![v("a,b"), v(" x ")])
        );
        assert_eq!(
            parse_array("{(0,0),(1,1);(2,2),(3,3)}", ';'),
            Ok(vec![v("(0,0),(1,1)"), v("(2,2),(3,3)")])
        );
        assert_eq!(parse_array(r#"{"",ü}"#, ','), Ok(vec![v(""), v("ü")]));
    }

    #[test]
    fn malformed_input_is_an_error_never_a_panic() {
        for bad in [
            "",
            "{",
            "}",
            "1,2",
            "{1,2",
            "{1,,2}",
            "{\"a}",
            "{a\"b}",
            "{1}x",
            "[0:1]{1}",
            "[a]={1}",
            "{{{{{{{1}}}}}}}",
            "{\\",
            "{,}",
            "{a{b}}",
        ] {
            assert!(parse_array(bad, ',').is_err(), "{bad:?} parsed");
        }
        // Six dimensions are PostgreSQL's maximum and parse.
        assert!(parse_array("{{{{{{1}}}}}}", ',').is_ok());
    }

    fn elem() -> impl Strategy<Value = Option<String>> {
        prop::option::of(any::<String>())
    }

    proptest! {
        #[test]
        fn format_then_parse_is_identity(items in prop::collection::vec(elem(), 0..8)) {
            let elems: Vec<ArrayElem> =
                items.iter().map(|i| i.clone().map_or(Null, Value)).collect();
            let text = format_array(&elems, ',');
            prop_assert_eq!(parse_array(&text, ','), Ok(elems));
        }

        #[test]
        fn nested_format_then_parse_is_identity(rows in prop::collection::vec(prop::collection::vec(elem(), 1..4), 1..4)) {
            let elems: Vec<ArrayElem> = rows
                .iter()
                .map(|r| Array(r.iter().map(|i| i.clone().map_or(Null, Value)).collect()))
                .collect();
            let text = format_array(&elems, ',');
            prop_assert_eq!(parse_array(&text, ','), Ok(elems));
        }

        #[test]
        fn any_text_parses_or_errs(text in any::<String>()) {
            let _ = parse_array(&text, ',');
        }
    }
}
