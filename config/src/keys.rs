//! Duplicate keys, found in the raw text: a parsed `Value` keeps only the last of them, while
//! hvisor-tool's cJSON uses the first, so the two would serve different devices.

use std::collections::HashSet;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::validate::join;
use crate::ConfigError;

/// Every repeated key in `text` (already known to be valid JSON), named by its JSON path.
pub fn duplicates(text: &str) -> Vec<ConfigError> {
    let mut found = Vec::new();
    let node = Node {
        path: String::new(),
        found: &mut found,
    };
    // Syntax errors were reported by the parse that came first.
    let _ = node.deserialize(&mut serde_json::Deserializer::from_str(text));
    found
}

/// One JSON value at `path`.
struct Node<'a> {
    path: String,
    found: &'a mut Vec<ConfigError>,
}

impl<'de> DeserializeSeed<'de> for Node<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0usize;
        loop {
            let item = Node {
                path: format!("{}[{i}]", self.path),
                found: &mut *self.found,
            };
            if seq.next_element_seed(item)?.is_none() {
                return Ok(());
            }
            i += 1;
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            let path = join(&self.path, &key);
            if !seen.insert(key) {
                self.found.push(ConfigError {
                    path: path.clone(),
                    reason: "duplicate key (hvisor-tool reads the first, other parsers the last): \
                             write it once"
                        .into(),
                });
            }
            map.next_value_seed(Node {
                path,
                found: &mut *self.found,
            })?;
        }
        Ok(())
    }
}
