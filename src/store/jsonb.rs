//! SQLite's binary JSON, JSONB (<https://sqlite.org/jsonb.html>), written directly: the rows a
//! batch gives one statement travel to SQLite as one JSONB blob, which its JSON functions read
//! as it is. As JSON text, every statement parsed the whole batch again, and each row's text
//! was written out and parsed once more to make the row a value of its own (see "Rows read once,
//! as JSONB" in docs/benchmarks.md).
//!
//! An element is a header (its type in the low 4 bits of the first byte, the size of its payload
//! in the high 4 bits or in the 1, 2 or 4 bytes after it) and a payload: a number's text, a
//! string's UTF-8 bytes (`TEXTRAW`: SQLite escapes them where JSON text needs it), or an array's
//! or object's elements. The format lets a header use more size bytes than it needs: arrays and
//! objects always take 4, written once their elements are.

use serde_json::Value;

const NULL: u8 = 0;
const TRUE: u8 = 1;
const FALSE: u8 = 2;
const INT: u8 = 3;
const FLOAT: u8 = 5;
const TEXT_RAW: u8 = 10;
const ARRAY: u8 = 11;
const OBJECT: u8 = 12;

/// A JSONB value being written: elements, arrays and objects in order, as JSON text would list them.
#[derive(Debug, Default)]
pub(crate) struct Jsonb {
    bytes: Vec<u8>,
    /// Where each array or object not yet ended begins.
    open: Vec<usize>,
    /// A container's payload did not fit its 4 size bytes (4 GiB).
    too_large: bool,
}

impl Jsonb {
    /// Starts an array; [`Jsonb::end`] ends it.
    pub(crate) fn begin_array(&mut self) -> &mut Self {
        self.begin(ARRAY)
    }

    fn begin(&mut self, kind: u8) -> &mut Self {
        self.open.push(self.bytes.len());
        self.bytes.extend_from_slice(&[0xe0 | kind, 0, 0, 0, 0]);
        self
    }

    /// Ends the array or object begun last.
    pub(crate) fn end(&mut self) -> &mut Self {
        if let Some(start) = self.open.pop() {
            let size = self.size32(self.bytes.len() - start - 5);
            self.bytes[start + 1..start + 5].copy_from_slice(&size.to_be_bytes());
        }
        self
    }

    /// A string.
    pub(crate) fn text(&mut self, text: &str) -> &mut Self {
        self.header(TEXT_RAW, text.len());
        self.bytes.extend_from_slice(text.as_bytes());
        self
    }

    /// A string, or null.
    pub(crate) fn text_or_null(&mut self, text: Option<&str>) -> &mut Self {
        match text {
            Some(text) => self.text(text),
            None => self.null(),
        }
    }

    /// Null.
    pub(crate) fn null(&mut self) -> &mut Self {
        self.bytes.push(NULL);
        self
    }

    /// An integer.
    pub(crate) fn int(&mut self, value: impl itoa::Integer) -> &mut Self {
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(value);
        self.header(INT, digits.len());
        self.bytes.extend_from_slice(digits.as_bytes());
        self
    }

    /// Any JSON value.
    pub(crate) fn value(&mut self, value: &Value) -> &mut Self {
        match value {
            Value::Null => self.null(),
            Value::Bool(b) => {
                self.bytes.push(if *b { TRUE } else { FALSE });
                self
            }
            Value::Number(n) => match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => self.int(i),
                (None, Some(u)) => self.int(u),
                // Finite (serde_json holds no NaN or infinity), written as JSON writes it.
                _ => {
                    let text = n.to_string();
                    self.header(FLOAT, text.len());
                    self.bytes.extend_from_slice(text.as_bytes());
                    self
                }
            },
            Value::String(s) => self.text(s),
            Value::Array(items) => {
                self.begin_array();
                for item in items {
                    self.value(item);
                }
                self.end()
            }
            Value::Object(fields) => {
                self.begin(OBJECT);
                for (key, item) in fields {
                    self.text(key);
                    self.value(item);
                }
                self.end()
            }
        }
    }

    /// The bytes, every array and object ended.
    pub(crate) fn finish(mut self) -> Result<Vec<u8>, sqlx::Error> {
        while !self.open.is_empty() {
            self.end();
        }
        if self.too_large {
            return Err(sqlx::Error::Encode("a JSONB array or object larger than 4 GiB".into()));
        }
        Ok(self.bytes)
    }

    /// A header of the smallest size for `size` bytes of payload.
    fn header(&mut self, kind: u8, size: usize) {
        match size {
            0..=11 => self.bytes.push(((size as u8) << 4) | kind),
            12..=0xff => self.bytes.extend_from_slice(&[0xc0 | kind, size as u8]),
            0x100..=0xffff => {
                self.bytes.push(0xd0 | kind);
                self.bytes.extend_from_slice(&(size as u16).to_be_bytes());
            }
            _ => {
                let size = self.size32(size);
                self.bytes.push(0xe0 | kind);
                self.bytes.extend_from_slice(&size.to_be_bytes());
            }
        }
    }

    /// `size` as a header's 4 size bytes hold it; one that does not fit marks the value too large
    /// (see [`Jsonb::finish`]).
    fn size32(&mut self, size: usize) -> u32 {
        u32::try_from(size).unwrap_or_else(|_| {
            self.too_large = true;
            0
        })
    }
}

/// `values` as one JSONB array.
pub(crate) fn array<'a>(values: impl IntoIterator<Item = &'a Value>) -> Result<Vec<u8>, sqlx::Error> {
    let mut jsonb = Jsonb::default();
    jsonb.begin_array();
    for value in values {
        jsonb.value(value);
    }
    jsonb.finish()
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use sqlx::{Connection, Row};

    /// SQLite reads each value back as the JSON it was: `json()` of the blob is `json()` of the
    /// text serde_json writes (both normalised by SQLite), and `->>` gives each string's text.
    #[tokio::test]
    async fn sqlite_reads_back_what_was_written() {
        sqlx::any::install_default_drivers();
        let mut db = sqlx::AnyConnection::connect("sqlite::memory:").await.expect("an in-memory SQLite");
        let long = "x".repeat(300);
        let longer = "y".repeat(70_000);
        let values = [
            json!(null),
            json!(true),
            json!(false),
            json!(0),
            json!(-7),
            json!(i64::MIN),
            json!(u64::MAX),
            json!(2.5),
            json!(-1.0e-300),
            json!(""),
            json!("eleven char"),
            json!("twelve chars"),
            json!("quote \" backslash \\ newline \n tab \t bell \u{7} nul \u{0} slash / é 漢 🦀"),
            json!(long),
            json!(longer),
            json!([]),
            json!({}),
            json!([["a", 1, null, [["sku", "name", 2, 1999, 3998]]], ["b", 2, "c", []]]),
            json!({"k": [1, {"n": "v"}], "": null, "é": true}),
        ];
        for value in &values {
            let blob = super::array([value]).expect("encodes");
            // (At most 100 characters of a value in a failure's message.)
            let shown: String = value.to_string().chars().take(100).collect();
            let row = sqlx::query("SELECT json($1) = json($2) AS same, substr(json($1), 1, 100) AS text, $1 ->> 0 AS first")
                .bind(blob)
                .bind(serde_json::to_string(&[value]).expect("serialises"))
                .fetch_one(&mut db)
                .await
                .unwrap_or_else(|e| panic!("SQLite refused the JSONB of {shown}: {e}"));
            assert_eq!(row.get::<i64, _>("same"), 1, "{shown} came back as {}", row.get::<String, _>("text"));
            if let Some(text) = value.as_str() {
                assert!(row.get::<String, _>("first") == text, "{shown}: `->>` read another text");
            }
        }
        // A batch of rows through `SQLITE_GIVEN`, as the statements read it.
        let rows = [json!(["a", 1, "x\"y"]), json!(["b", 2, null]), json!(["c", 3, long])];
        let sql = format!("{} SELECT r ->> 0 AS k, r ->> 1 AS n, r ->> 2 AS t FROM given", super::super::SQLITE_GIVEN);
        let read: Vec<(String, i64, Option<String>)> = sqlx::query(&sql)
            .bind(super::array(&rows).expect("encodes"))
            .fetch_all(&mut db)
            .await
            .expect("reads the rows")
            .iter()
            .map(|r| (r.get("k"), r.get("n"), r.get("t")))
            .collect();
        assert_eq!(read, [("a".into(), 1, Some("x\"y".into())), ("b".into(), 2, None), ("c".into(), 3, Some(long.clone()))]);
    }
}
