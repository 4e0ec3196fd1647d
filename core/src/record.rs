//! PostgreSQL's composite text form, as `record_out` writes it: `(1,"a b",,"say ""hi""")`.
//! The capture trigger stores row images this way (it runs no type owner's code, unlike
//! `row_to_json`, which calls a cast to json), and the stream reads them back here.
//!
//! The rules (PostgreSQL's rowtypes.c): fields are separated by commas inside parentheses; an
//! empty unquoted field is NULL; a field is quoted when it is empty or holds a quote, a
//! backslash, a parenthesis, a comma or white space, and inside quotes `"` and `\` are
//! doubled. `record_in` also takes a backslash as an escape anywhere, which this reader
//! accepts too. No crate reads this format; it is small and fully specified, so it is written
//! here and unit-tested.

use std::borrow::Cow;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field<'a> {
    Null,
    Value(Cow<'a, str>),
    /// A value longer than the caller's limit: skipped without being copied.
    TooLong,
}

/// The fields of one record, in order. `max` bounds the length of a value that is kept
/// (longer ones come back as `Field::TooLong`).
pub fn parse(text: &str, max: usize) -> Result<Vec<Field<'_>>, String> {
    let b = text.as_bytes();
    if b.first() != Some(&b'(') || b.last() != Some(&b')') || b.len() < 2 {
        return Err("a record must be written in parentheses".into());
    }
    let end = b.len() - 1;
    let mut out = Vec::new();
    let mut i = 1;
    loop {
        // One field, up to the next unquoted comma or the closing parenthesis.
        let start = i;
        let mut quoted = false;
        let mut in_quotes = false;
        let mut escaped = false; // the value differs from the raw slice
        let mut len = 0usize;
        let mut owned: Option<Vec<u8>> = None;
        while i < end {
            let c = b[i];
            if in_quotes {
                if c == b'"' {
                    if b.get(i + 1) == Some(&b'"') {
                        push(&mut owned, &mut len, max, b'"');
                        escaped = true;
                        i += 2;
                        continue;
                    }
                    in_quotes = false;
                    i += 1;
                    continue;
                }
                if c == b'\\' && i + 1 < end {
                    push(&mut owned, &mut len, max, b[i + 1]);
                    escaped = true;
                    i += 2;
                    continue;
                }
                push(&mut owned, &mut len, max, c);
                i += 1;
                continue;
            }
            match c {
                b',' => break,
                b'"' => {
                    quoted = true;
                    in_quotes = true;
                    escaped = true;
                    i += 1;
                }
                b'\\' if i + 1 < end => {
                    push(&mut owned, &mut len, max, b[i + 1]);
                    escaped = true;
                    i += 2;
                }
                _ => {
                    push(&mut owned, &mut len, max, c);
                    i += 1;
                }
            }
        }
        if in_quotes {
            return Err("a quoted field is not closed".into());
        }
        let raw = &text[start..i];
        out.push(if len > max {
            Field::TooLong
        } else if !quoted && raw.is_empty() {
            Field::Null
        } else if escaped {
            let bytes = owned.unwrap_or_default();
            Field::Value(Cow::Owned(
                String::from_utf8(bytes).map_err(|_| "a field is not valid UTF-8".to_string())?,
            ))
        } else {
            Field::Value(Cow::Borrowed(raw))
        });
        if i >= end {
            return Ok(out);
        }
        i += 1; // the comma
    }
}

/// Gather a field's bytes, up to `max` (the length is still counted past it).
fn push(owned: &mut Option<Vec<u8>>, len: &mut usize, max: usize, c: u8) {
    *len += 1;
    if *len > max {
        *owned = None;
        return;
    }
    owned.get_or_insert_with(Vec::new).push(c);
}

/// A row image as a JSON object, each column by name: its text output as a JSON string, or for
/// json and jsonb columns (`json` true) the JSON itself. `columns` are the image's columns in
/// order (name, json). A value longer than `max` becomes null (an image's long values are
/// never keys). The stream reads the object with `jsonb_to_record` and each column's safe type.
pub fn image_json(
    columns: &[(String, bool)],
    text: &str,
    max: usize,
) -> Result<serde_json::Value, String> {
    let fields = parse(text, max)?;
    if fields.len() != columns.len() {
        return Err(format!(
            "a row image has {} fields where its table has {} columns",
            fields.len(),
            columns.len()
        ));
    }
    let mut obj = serde_json::Map::with_capacity(columns.len());
    for ((name, json), f) in columns.iter().zip(fields) {
        let v = match f {
            Field::Null | Field::TooLong => serde_json::Value::Null,
            Field::Value(v) if *json => {
                let parsed: serde_json::Value =
                    serde_json::from_str(&v).map_err(|e| format!("column {name}: {e}"))?;
                if v.contains("\\u0000") {
                    without_nul(parsed)
                } else {
                    parsed
                }
            }
            Field::Value(v) => serde_json::Value::String(v.into_owned()),
        };
        obj.insert(name.clone(), v);
    }
    Ok(serde_json::Value::Object(obj))
}

/// A json value (json keeps `\u0000`, jsonb refuses it) with its NUL characters taken out of
/// every string and key: an image is read as jsonb for attribution, which only looks at keys,
/// foreign keys and the root's predicate columns (the rows sent are read at the stream's
/// snapshot, as they are).
fn without_nul(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::String(s) => Value::String(s.replace('\0', "")),
        Value::Array(a) => Value::Array(a.into_iter().map(without_nul).collect()),
        Value::Object(o) => Value::Object(
            o.into_iter()
                .map(|(k, v)| (k.replace('\0', ""), without_nul(v)))
                .collect(),
        ),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(s: &str) -> Vec<Option<String>> {
        parse(s, 1 << 20)
            .unwrap()
            .into_iter()
            .map(|f| match f {
                Field::Null => None,
                Field::Value(v) => Some(v.into_owned()),
                Field::TooLong => Some("<long>".into()),
            })
            .collect()
    }

    #[test]
    fn a_json_value_with_nul_reads_as_jsonb_can_hold_it() {
        let cols = [("id".to_string(), false), ("js".to_string(), true)];
        let v = image_json(&cols, r#"(7,"{""a\\u0000"": [""x\\u0000y"", 1]}")"#, 1 << 20).unwrap();
        assert_eq!(v["js"], serde_json::json!({"a": ["xy", 1]}));
        assert_eq!(v["id"], serde_json::json!("7"));
    }

    #[test]
    fn reads_what_record_out_writes() {
        assert_eq!(
            vals(r#"(7,"hello, ""world""",hel,7,x)"#),
            [
                Some("7"),
                Some(r#"hello, "world""#),
                Some("hel"),
                Some("7"),
                Some("x")
            ]
            .map(|v| v.map(String::from))
            .to_vec()
        );
        assert_eq!(
            vals("(1,,\"\")"),
            vec![Some("1".into()), None, Some("".into())]
        );
        assert_eq!(vals("()"), vec![None]);
        assert_eq!(
            vals(r#"(1,happy,5,"{sad,happy}","{""a"": [1, 2]}")"#),
            vec![
                Some("1".into()),
                Some("happy".into()),
                Some("5".into()),
                Some("{sad,happy}".into()),
                Some(r#"{"a": [1, 2]}"#.into())
            ]
        );
        assert_eq!(
            vals(r#"("a\\b","(1,2)")"#),
            vec![Some(r"a\b".into()), Some("(1,2)".into())]
        );
        assert_eq!(
            vals("(\"é ü\",日本)"),
            vec![Some("é ü".into()), Some("日本".into())]
        );
        assert_eq!(
            vals("(a\\,b)"),
            vec![Some("a,b".into())],
            "record_in's backslash escape"
        );
    }

    #[test]
    fn images_become_json_objects_of_text_and_json() {
        let cols = vec![
            ("id".to_string(), false),
            ("doc".to_string(), true),
            ("n".to_string(), false),
        ];
        let v = image_json(&cols, r#"(5,"{""a"": [1, 2]}",)"#, 100).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id": "5", "doc": {"a": [1, 2]}, "n": null})
        );
        assert!(
            image_json(&cols, "(5)", 100).is_err(),
            "a column count that differs"
        );
    }

    #[test]
    fn long_values_are_skipped_and_bad_input_refused() {
        let long = format!("(1,\"{}\",3)", "x".repeat(100));
        let f = parse(&long, 10).unwrap();
        assert_eq!(f[1], Field::TooLong);
        assert_eq!(f[2], Field::Value(Cow::Borrowed("3")));
        assert!(parse("1,2", 10).is_err());
        assert!(parse("(\"open)", 10).is_err());
        assert!(parse("", 10).is_err());
    }
}
