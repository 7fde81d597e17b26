//! bytea's text forms in and out: PostgreSQL's `\x…` hex (or the old escape format), base64 for the
//! message, plain hex for ClickHouse. Small enough not to pull in a crate.

/// Decodes bytea's output text: hex (`\x00ff`, the default since 9.0) or escape format (`bytea_output
/// = escape`: printable bytes as themselves, `\\`, and `\ooo` octal).
pub(crate) fn decode_pg(text: &str) -> Result<Vec<u8>, String> {
    if let Some(hex) = text.strip_prefix("\\x") {
        return decode_hex(hex);
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b != b'\\' {
            out.push(b);
            i += 1;
            continue;
        }
        match bytes.get(i + 1..i + 4) {
            _ if bytes.get(i + 1) == Some(&b'\\') => {
                out.push(b'\\');
                i += 2;
            }
            Some(&[a, b2, c]) if (b'0'..=b'3').contains(&a) && is_octal(b2) && is_octal(c) => {
                out.push(((a - b'0') << 6) | ((b2 - b'0') << 3) | (c - b'0'));
                i += 4;
            }
            _ => return Err("invalid escape in bytea text".into()),
        }
    }
    Ok(out)
}

fn is_octal(b: u8) -> bool {
    (b'0'..=b'7').contains(&b)
}

fn decode_hex(hex: &str) -> Result<Vec<u8>, String> {
    let digits = hex.as_bytes();
    if !digits.len().is_multiple_of(2) {
        return Err("odd number of hex digits".into());
    }
    digits
        .chunks_exact(2)
        .map(|pair| match pair {
            [h, l] => Ok((hex_val(*h)? << 4) | hex_val(*l)?),
            _ => Err("odd number of hex digits".into()),
        })
        .collect()
}

fn hex_val(b: u8) -> Result<u8, String> {
    match b {
        b'0'..=b'9' => Ok(b - b'0'),
        b'a'..=b'f' => Ok(b - b'a' + 10),
        b'A'..=b'F' => Ok(b - b'A' + 10),
        _ => Err(format!("not a hex digit: {:?}", char::from(b))),
    }
}

/// Lowercase hex without a prefix: what ClickHouse's `unhex()` turns back into the bytes.
pub(crate) fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (RFC 4648 §4), as Debezium writes bytes.
pub(crate) fn encode_base64(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                s.push(char::from(B64[((n >> (18 - 6 * i)) & 0x3f) as usize]));
            } else {
                s.push('=');
            }
        }
    }
    s
}

pub(crate) fn decode_base64(text: &str) -> Result<Vec<u8>, String> {
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(4) {
        return Err("base64 length is not a multiple of 4".into());
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    let quads = bytes.len() / 4;
    for (q, quad) in bytes.chunks_exact(4).enumerate() {
        let last = q + 1 == quads;
        let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return Err("misplaced base64 padding".into());
        }
        let mut n: u32 = 0;
        for &c in quad.iter().take(4 - pad) {
            let v = B64
                .iter()
                .position(|&x| x == c)
                .ok_or("not a base64 character")?;
            n = (n << 6) | v as u32;
        }
        n <<= 6 * pad as u32;
        let [_, a, b, c] = n.to_be_bytes();
        out.extend_from_slice(&[a, b, c][..3 - pad]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pg_forms() {
        assert_eq!(decode_pg("\\x00ff"), Ok(vec![0, 255]));
        assert_eq!(decode_pg("\\x"), Ok(vec![]));
        assert_eq!(decode_pg("\\xABcd"), Ok(vec![0xab, 0xcd]));
        assert_eq!(
            decode_pg("a\\000b\\\\\\377"),
            Ok(vec![b'a', 0, b'b', b'\\', 255])
        );
        for bad in ["\\x0", "\\xzz", "\\4", "a\\", "\\09"] {
            assert!(decode_pg(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn base64_known_values() {
        assert_eq!(encode_base64(b""), "");
        assert_eq!(encode_base64(&[0, 255]), "AP8=");
        assert_eq!(encode_base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(encode_base64(b"fooba"), "Zm9vYmE=");
        assert_eq!(encode_base64(b"foob"), "Zm9vYg==");
        for bad in ["A", "A===", "AP8=AP8=", "AP*="] {
            assert!(decode_base64(bad).is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn base64_and_hex_round_trip(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            prop_assert_eq!(decode_base64(&encode_base64(&bytes)), Ok(bytes.clone()));
            prop_assert_eq!(decode_pg(&format!("\\x{}", encode_hex(&bytes))), Ok(bytes));
        }

        #[test]
        fn any_text_decodes_or_errs(text in any::<String>()) {
            let _ = decode_pg(&text);
            let _ = decode_base64(&text);
        }
    }
}
