//! The root predicate (`poco_scope_root(tbl, 'id = $1 OR parent_id = $1')`) is SQL text written
//! by a DBA and pasted into every compiled scope query. Before that, it is lexed here so that:
//! - it is one expression: parentheses balance and never close below the start, and there is no
//!   top-level `;` — otherwise `id = $1) OR (true` would turn `WHERE (pred)` into a leak;
//! - its only parameter is `$1`, and it uses `$1` at all (a predicate without the parent id would
//!   select the same rows for every parent);
//! - `$1` can be replaced by another expression (a cast, or a column of a candidate-parents list
//!   when finding the owners of a row) without touching strings, quoted names or comments.
//!
//! PostgreSQL's own scanner is not reachable from a pure crate and no maintained crate exposes
//! it without building libpg_query, so this is a small lexer for exactly the token classes that
//! can hide a `(`, `)`, `;` or `$1`: string constants ('', E'', U&'', B'', X''), dollar quotes,
//! quoted identifiers, and both comment styles. The parse itself is left to PostgreSQL.

use crate::error::{PocoError, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Predicate {
    /// The text split around each `$1`: `parts.len() == uses + 1`.
    parts: Vec<String>,
    /// It holds a subquery (the words SELECT or TABLE outside strings and quoted names): it
    /// reads rows other than the root row it is evaluated on.
    subquery: bool,
}

fn bad(msg: &str) -> PocoError {
    PocoError::ScopePredicate(msg.to_string())
}

impl Predicate {
    pub fn parse(text: &str) -> Result<Predicate> {
        let b = text.as_bytes();
        let mut parts = Vec::new();
        let mut start = 0usize;
        let mut depth = 0i32;
        let mut i = 0usize;
        let mut nonblank = false;
        let mut subquery = false;
        while i < b.len() {
            let c = b[i];
            match c {
                b'\'' => {
                    // E'..' allows backslash escapes; the prefix letter was already passed.
                    let escapes =
                        i > 0 && matches!(b[i - 1], b'e' | b'E') && (i < 2 || !is_ident(b[i - 2]));
                    i = skip_quoted(b, i, b'\'', escapes)
                        .ok_or_else(|| bad("unterminated string constant"))?;
                    nonblank = true;
                    continue;
                }
                b'"' => {
                    let end = skip_quoted(b, i, b'"', false)
                        .ok_or_else(|| bad("unterminated quoted identifier"))?;
                    reserved(&text[i + 1..end - 1].replace("\"\"", "\""))?;
                    i = end;
                    nonblank = true;
                    continue;
                }
                b'-' if b.get(i + 1) == Some(&b'-') => {
                    while i < b.len() && b[i] != b'\n' {
                        i += 1;
                    }
                    continue;
                }
                b'/' if b.get(i + 1) == Some(&b'*') => {
                    let mut level = 0;
                    loop {
                        if i + 1 >= b.len() {
                            return Err(bad("unterminated /* comment"));
                        }
                        if b[i] == b'/' && b[i + 1] == b'*' {
                            level += 1;
                            i += 2;
                        } else if b[i] == b'*' && b[i + 1] == b'/' {
                            level -= 1;
                            i += 2;
                            if level == 0 {
                                break;
                            }
                        } else {
                            i += 1;
                        }
                    }
                    continue;
                }
                b'$' => {
                    // A parameter ($n), a dollar quote ($$ or $tag$), or part of an identifier.
                    if i > 0 && is_ident(b[i - 1]) {
                        i += 1;
                        continue;
                    }
                    let mut j = i + 1;
                    if j < b.len() && b[j].is_ascii_digit() {
                        while j < b.len() && b[j].is_ascii_digit() {
                            j += 1;
                        }
                        if &text[i + 1..j] != "1" {
                            return Err(bad(&format!(
                                "it uses parameter {}; the only parameter is $1, the parent id",
                                &text[i..j]
                            )));
                        }
                        if j < b.len() && is_ident(b[j]) {
                            return Err(bad("a parameter is followed directly by a name"));
                        }
                        parts.push(text[start..i].to_string());
                        start = j;
                        i = j;
                        nonblank = true;
                        continue;
                    }
                    // A tag: $$ or $name$ (the first character is not a digit: that was a parameter).
                    while j < b.len() && is_ident(b[j]) {
                        j += 1;
                    }
                    if j < b.len() && b[j] == b'$' {
                        let tag = &text[i..=j];
                        let body = j + 1;
                        match text[body..].find(tag) {
                            Some(k) => {
                                i = body + k + tag.len();
                                nonblank = true;
                                continue;
                            }
                            None => return Err(bad("unterminated dollar-quoted string")),
                        }
                    }
                    i += 1;
                    continue;
                }
                b'(' => depth += 1,
                b')' => {
                    depth -= 1;
                    if depth < 0 {
                        return Err(bad("it closes a parenthesis it did not open"));
                    }
                }
                b';' => return Err(bad("it contains a semicolon; give one boolean expression")),
                c if is_ident(c) && !c.is_ascii_digit() && (i == 0 || !is_ident(b[i - 1])) => {
                    // A name (or a keyword): the compiled queries' own names are not the
                    // predicate's to use.
                    let mut j = i;
                    while j < b.len() && (is_ident(b[j]) || b[j] == b'$') {
                        j += 1;
                    }
                    reserved(&text[i..j])?;
                    if matches!(text[i..j].to_ascii_uppercase().as_str(), "SELECT" | "TABLE") {
                        subquery = true;
                    }
                    i = j;
                    nonblank = true;
                    continue;
                }
                _ => {}
            }
            if !c.is_ascii_whitespace() {
                nonblank = true;
            }
            i += 1;
        }
        if depth != 0 {
            return Err(bad("a parenthesis is not closed"));
        }
        if !nonblank {
            return Err(bad("it is empty"));
        }
        parts.push(text[start..].to_string());
        if parts.len() < 2 {
            return Err(bad("it does not use $1, the parent id, so it would select the same rows for every parent"));
        }
        Ok(Predicate { parts, subquery })
    }

    /// Whether it reads rows other than the one it is evaluated on (a subquery).
    pub fn has_subquery(&self) -> bool {
        self.subquery
    }

    /// The predicate with every `$1` replaced by `param` (wrapped in parentheses).
    pub fn with_param(&self, param: &str) -> String {
        self.parts.join(&format!("({param})"))
    }

    /// How many times `$1` occurs.
    pub fn uses(&self) -> usize {
        self.parts.len() - 1
    }
}

/// Names beginning with `poco_` belong to the queries poco_sync compiles around the predicate
/// (`poco_p`, the candidate parents; `poco_r`, the rows reached): a predicate naming one could
/// bind to them. `poco_root` is the root row itself.
fn reserved(name: &str) -> Result<()> {
    let lower = name.to_lowercase();
    if lower.starts_with("poco_") && lower != crate::scope::ROOT_ALIAS {
        return Err(bad(&format!(
            "it uses the name {name}; names beginning with poco_ belong to the queries poco_sync builds around the predicate (only poco_root, the root row, may be named)"
        )));
    }
    Ok(())
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80
}

/// Skip a quoted token starting at `i` (which holds `q`); returns the index after it.
fn skip_quoted(b: &[u8], mut i: usize, q: u8, backslash: bool) -> Option<usize> {
    i += 1;
    while i < b.len() {
        if backslash && b[i] == b'\\' {
            i += 2;
            continue;
        }
        if b[i] == q {
            if b.get(i + 1) == Some(&q) {
                i += 2;
                continue;
            }
            return Some(i + 1);
        }
        i += 1;
    }
    None
}
