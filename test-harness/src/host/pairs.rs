//! The proxy-wasm header map format (ABI 0.2.1 "Serialization"; the SDK's
//! `serialize_map`/`deserialize_map`; cpp-host `src/pairs_util.cc`). All integers are u32
//! little-endian:
//!
//! ```text
//! u32 N,  N × (u32 key_len, u32 value_len),  N × (key, 0x00, value, 0x00)
//! ```
//!
//! The lengths leave out the NUL that follows each key and value.

/// Header pairs as bytes: hosts hand over whatever the client sent.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

pub fn serialize(pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let size = 4 + pairs.iter().map(|(k, v)| 10 + k.len() + v.len()).sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&len32(pairs.len()).to_le_bytes());
    for (key, value) in pairs {
        out.extend_from_slice(&len32(key.len()).to_le_bytes());
        out.extend_from_slice(&len32(value.len()).to_le_bytes());
    }
    for (key, value) in pairs {
        out.extend_from_slice(key);
        out.push(0);
        out.extend_from_slice(value);
        out.push(0);
    }
    out
}

/// Reads a serialized map; `None` if the bytes are not one. An empty input (or a single
/// `0x00`, which the spec also allows) is the empty map.
pub fn deserialize(bytes: &[u8]) -> Option<Pairs> {
    if bytes.is_empty() || bytes == [0] {
        return Some(Vec::new());
    }
    let word = |at: usize| -> Option<usize> {
        let raw = bytes.get(at..at + 4)?;
        usize::try_from(u32::from_le_bytes(raw.try_into().ok()?)).ok()
    };
    let count = word(0)?;
    let mut data = 4usize.checked_add(count.checked_mul(8)?)?;
    let mut pairs = Vec::with_capacity(count.min(1024));
    for i in 0..count {
        let key_len = word(4 + 8 * i)?;
        let value_len = word(8 + 8 * i)?;
        let key = bytes.get(data..data + key_len)?.to_vec();
        data += key_len;
        if bytes.get(data) != Some(&0) {
            return None;
        }
        data += 1;
        let value = bytes.get(data..data + value_len)?.to_vec();
        data += value_len;
        if bytes.get(data) != Some(&0) {
            return None;
        }
        data += 1;
        pairs.push((key, value));
    }
    (data == bytes.len()).then_some(pairs)
}

fn len32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// Owned pairs from string slices, for tests and scripts.
pub fn pairs(items: &[(&str, &str)]) -> Pairs {
    items.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `SERIALIZED_MAP` from the SDK's own tests (`src/hostcalls.rs`).
    #[test]
    fn matches_the_sdks_worked_example() {
        let map = pairs(&[
            (":method", "GET"),
            (":path", "/bytes/1"),
            (":authority", "httpbin.org"),
            ("Powered-By", "proxy-wasm"),
        ]);
        let mut expected = vec![4, 0, 0, 0];
        for (k, v) in [(7u8, 3u8), (5, 8), (10, 11), (10, 10)] {
            expected.extend_from_slice(&[k, 0, 0, 0, v, 0, 0, 0]);
        }
        expected.extend_from_slice(
            b":method\0GET\0:path\0/bytes/1\0:authority\0httpbin.org\0Powered-By\0proxy-wasm\0",
        );
        assert_eq!(serialize(&map), expected);
        assert_eq!(deserialize(&expected), Some(map));
    }

    #[test]
    fn refuses_what_is_not_a_map() {
        assert_eq!(deserialize(&[]), Some(vec![]));
        assert_eq!(deserialize(&[0]), Some(vec![]));
        let good = serialize(&pairs(&[("a", "1")]));
        assert!(deserialize(&good[..good.len() - 1]).is_none());
        let mut no_nul = good.clone();
        let last = no_nul.len() - 1;
        no_nul[last] = b'x';
        assert!(deserialize(&no_nul).is_none());
        assert!(deserialize(&[0xff, 0xff, 0xff, 0xff]).is_none());
    }
}
