//! Numbers as hvisor-tool reads them: a JSON integer, or a string parsed like C
//! `strtoumax(s, &end, 0)` with the whole string consumed.

use serde_json::{Number, Value};

/// hvisor-tool reads JSON numbers through cJSON's `valueint`, a C `int`.
pub const C_INT_MAX: u64 = i32::MAX as u64;

/// A number that was read, and whether it was a JSON number too large for hvisor-tool.
#[derive(Debug)]
pub struct Parsed {
    pub value: u64,
    pub wide_json_number: bool,
}

/// Reads `value` as an unsigned number of at most `bits` bits (8, 32 or 64).
pub fn parse_value(value: &Value, bits: u32) -> Result<Parsed, String> {
    let (n, wide) = match value {
        Value::Number(n) => {
            let v = json_number(n)?;
            (v, v > C_INT_MAX)
        }
        Value::String(s) => (parse_c_string(s)?, false),
        other => {
            return Err(format!(
                "must be a number or a numeric string, not {}",
                kind_of(other)
            ))
        }
    };
    let max = if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    if n > max {
        return Err(format!("{n} does not fit in {bits} bits (at most {max})"));
    }
    Ok(Parsed {
        value: n,
        wide_json_number: wide,
    })
}

fn json_number(n: &Number) -> Result<u64, String> {
    if let Some(v) = n.as_u64() {
        return Ok(v);
    }
    if n.as_i64().is_some() {
        return Err(format!("{n} is negative"));
    }
    // Without arbitrary precision, serde_json keeps anything else as an f64.
    let f = n.as_f64().unwrap_or(f64::NAN);
    if f.is_sign_negative() && f != 0.0 {
        Err(format!("{n} is negative"))
    } else if f.fract() != 0.0 || !f.is_finite() {
        Err(format!("{n} is not an integer"))
    } else if f == 0.0 {
        // `0.0` or `-0.0`: an integer value, written as a float.
        Ok(0)
    } else {
        Err(format!("{n} is out of range (more than 64 bits)"))
    }
}

/// C `isspace` in the "C" locale.
fn is_c_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

/// `strtoumax(s, &end, 0)` requiring `*end == '\0'`: leading white space, an optional `+`,
/// then `0x`/`0X` hex, a leading `0` for octal, or decimal. A `-` is refused rather than
/// wrapped around as C would.
pub fn parse_c_string(s: &str) -> Result<u64, String> {
    let not_a_number = || format!("{s:?} is not a number");
    let t = s.trim_start_matches(is_c_space);
    if t.starts_with('-') {
        return Err(format!("{s:?} is negative"));
    }
    let t = t.strip_prefix('+').unwrap_or(t);
    if t.is_empty() {
        return Err(if s.is_empty() {
            "empty string is not a number".to_string()
        } else {
            not_a_number()
        });
    }
    let (digits, radix) = if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        (hex, 16)
    } else if t.len() > 1 && t.starts_with('0') {
        (&t[1..], 8)
    } else {
        (t, 10)
    };
    // from_str_radix would accept a sign of its own; only bare digits are valid here.
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(not_a_number());
    }
    u64::from_str_radix(digits, radix)
        .map_err(|_| format!("{s:?} is out of range (more than 64 bits)"))
}

pub fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bases() {
        assert_eq!(parse_c_string("0x5000").unwrap(), 0x5000);
        assert_eq!(parse_c_string("0XaBc").unwrap(), 0xabc);
        assert_eq!(parse_c_string("0755").unwrap(), 0o755);
        assert_eq!(parse_c_string("0").unwrap(), 0);
        assert_eq!(parse_c_string("00").unwrap(), 0);
        assert_eq!(parse_c_string("1234").unwrap(), 1234);
        assert_eq!(parse_c_string(" \t\n+42").unwrap(), 42);
        assert_eq!(parse_c_string("0xffffffffffffffff").unwrap(), u64::MAX);
        assert_eq!(parse_c_string("18446744073709551615").unwrap(), u64::MAX);
        assert_eq!(parse_c_string("01777777777777777777777").unwrap(), u64::MAX);
    }

    #[test]
    fn malformed_strings() {
        for s in [
            "", " ", "0x", "0x5000zz", "08", "12a", "1 ", "+", "++1", "+-1", "0x-1", "1_000",
            "1.5", "1e3", "０", "abc",
        ] {
            let e = parse_c_string(s).unwrap_err();
            assert!(e.contains("not a number"), "{s:?}: {e}");
        }
        assert!(parse_c_string("-1").unwrap_err().contains("negative"));
        assert!(parse_c_string("  -0x10").unwrap_err().contains("negative"));
        assert!(parse_c_string("0x10000000000000000")
            .unwrap_err()
            .contains("out of range"));
        assert!(parse_c_string("18446744073709551616")
            .unwrap_err()
            .contains("out of range"));
    }

    #[test]
    fn json_values() {
        assert_eq!(parse_value(&json!(7), 32).unwrap().value, 7);
        assert!(!parse_value(&json!(7), 32).unwrap().wide_json_number);
        assert!(
            parse_value(&json!(0x8000_0000u64), 64)
                .unwrap()
                .wide_json_number
        );
        assert!(
            !parse_value(&json!("0x80000000"), 64)
                .unwrap()
                .wide_json_number
        );
        assert!(parse_value(&json!(-1), 64)
            .unwrap_err()
            .contains("negative"));
        assert!(parse_value(&json!(-1.5), 64)
            .unwrap_err()
            .contains("negative"));
        assert!(parse_value(&json!(1.5), 64)
            .unwrap_err()
            .contains("not an integer"));
        assert!(parse_value(&json!(1e30), 64)
            .unwrap_err()
            .contains("out of range"));
        assert!(parse_value(&json!(true), 64)
            .unwrap_err()
            .contains("boolean"));
        assert!(parse_value(&json!(null), 64).unwrap_err().contains("null"));
        assert!(parse_value(&json!(256), 8).unwrap_err().contains("8 bits"));
        assert!(parse_value(&json!("0x100000000"), 32)
            .unwrap_err()
            .contains("32 bits"));
        assert_eq!(parse_value(&json!("0xff"), 8).unwrap().value, 255);
    }
}
