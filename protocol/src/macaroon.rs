//! Macaroons in the V2 binary format, with first-party caveats, as libmacaroons,
//! go-macaroon and pymacaroons implement them.
//!
//! Format (libmacaroons `doc/format.txt`): the byte `0x02`, then fields of
//! `varint type, varint length, bytes`, where a bare `varint 0` ends a section:
//!
//! ```text
//! 02 [location] identifier EOS { [location] caveat-id [verification-id] EOS }* EOS signature
//! ```
//!
//! Signature (every real implementation; the L402 spec repo's text leaves out the first step):
//! `k = HMAC-SHA256("macaroons-key-generator", root_key)`, `sig = HMAC(k, identifier)`, then
//! `sig = HMAC(sig, caveat)` for each first-party caveat.
//!
//! No Rust macaroon crate builds for `wasm32-wasip1` without libsodium, so the codec is here;
//! it is small and checked against the libmacaroons vectors.

use core::fmt;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The largest macaroon accepted. An L402 macaroon with a few caveats is under 400 bytes.
pub const MAX_MACAROON_LEN: usize = 4096;
/// More caveats than any real credential carries; bounds the verification work.
pub const MAX_CAVEATS: usize = 32;

const VERSION_2: u8 = 2;
const KEY_GENERATOR: &[u8] = b"macaroons-key-generator";

mod field {
    pub const EOS: u64 = 0;
    pub const LOCATION: u64 = 1;
    pub const IDENTIFIER: u64 = 2;
    pub const VID: u64 = 4;
    pub const SIGNATURE: u64 = 6;
}

/// A caveat: first-party when it has no verification id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Caveat {
    pub location: Vec<u8>,
    pub id: Vec<u8>,
    pub verification_id: Option<Vec<u8>>,
}

#[derive(Clone, PartialEq, Eq)]
pub struct Macaroon {
    location: Vec<u8>,
    identifier: Vec<u8>,
    caveats: Vec<Caveat>,
    signature: [u8; 32],
}

/// Why bytes are not a V2 macaroon, or a macaroon does not verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MacaroonError {
    TooLong,
    /// Not version 2 (V1 is a different, text-based encoding).
    UnsupportedVersion,
    /// Ends inside a field, or a varint runs past its 10 bytes.
    Truncated,
    /// A field type out of place, a repeated or missing field, or bytes after the signature.
    Malformed,
    TooManyCaveats,
    /// A caveat with a verification id: it needs a discharge macaroon, which L402 never uses.
    ThirdPartyCaveat,
    BadSignature,
}

impl fmt::Display for MacaroonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MacaroonError::TooLong => "macaroon too long",
            MacaroonError::UnsupportedVersion => "not a V2 macaroon",
            MacaroonError::Truncated => "truncated macaroon",
            MacaroonError::Malformed => "malformed macaroon",
            MacaroonError::TooManyCaveats => "too many caveats",
            MacaroonError::ThirdPartyCaveat => "third-party caveats are not supported",
            MacaroonError::BadSignature => "bad macaroon signature",
        })
    }
}

impl fmt::Debug for Macaroon {
    /// Leaves out the signature: with the identifier it is a bearer credential.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Macaroon")
            .field("location", &String::from_utf8_lossy(&self.location))
            .field("identifier_len", &self.identifier.len())
            .field("caveats", &self.caveats.len())
            .finish_non_exhaustive()
    }
}

impl Macaroon {
    /// A new macaroon, signed with `root_key`.
    pub fn mint(root_key: &[u8], identifier: &[u8], location: &[u8]) -> Macaroon {
        Macaroon {
            location: location.to_vec(),
            identifier: identifier.to_vec(),
            caveats: Vec::new(),
            signature: mac(&derived_key(root_key), identifier),
        }
    }

    /// Attenuates the macaroon with a first-party caveat; anyone holding it can do this.
    pub fn add_first_party_caveat(&mut self, caveat: &[u8]) {
        self.signature = mac(&self.signature, caveat);
        self.caveats.push(Caveat { id: caveat.to_vec(), ..Caveat::default() });
    }

    pub fn identifier(&self) -> &[u8] {
        &self.identifier
    }

    pub fn location(&self) -> &[u8] {
        &self.location
    }

    pub fn caveats(&self) -> &[Caveat] {
        &self.caveats
    }

    pub fn signature(&self) -> &[u8; 32] {
        &self.signature
    }

    /// Checks the signature chain under `root_key` (constant-time compare) and returns the
    /// first-party caveat ids, which the caller must then check.
    pub fn verify(&self, root_key: &[u8]) -> Result<Vec<&[u8]>, MacaroonError> {
        let mut step = keyed(&derived_key(root_key), &self.identifier);
        let mut ids = Vec::with_capacity(self.caveats.len());
        for caveat in &self.caveats {
            if caveat.verification_id.is_some() {
                return Err(MacaroonError::ThirdPartyCaveat);
            }
            step = keyed(&step.finalize().into_bytes(), &caveat.id);
            ids.push(caveat.id.as_slice());
        }
        // `verify_slice` compares in constant time.
        step.verify_slice(&self.signature).map(|()| ids).map_err(|_| MacaroonError::BadSignature)
    }

    /// The V2 binary encoding. An empty location is left out, as libmacaroons does.
    pub fn to_binary(&self) -> Vec<u8> {
        let mut out = vec![VERSION_2];
        if !self.location.is_empty() {
            put_field(&mut out, field::LOCATION, &self.location);
        }
        put_field(&mut out, field::IDENTIFIER, &self.identifier);
        put_varint(&mut out, field::EOS);
        for caveat in &self.caveats {
            if !caveat.location.is_empty() {
                put_field(&mut out, field::LOCATION, &caveat.location);
            }
            put_field(&mut out, field::IDENTIFIER, &caveat.id);
            if let Some(vid) = &caveat.verification_id {
                put_field(&mut out, field::VID, vid);
            }
            put_varint(&mut out, field::EOS);
        }
        put_varint(&mut out, field::EOS);
        put_field(&mut out, field::SIGNATURE, &self.signature);
        out
    }

    /// Reads a V2 binary macaroon. Any bytes give an answer, never a panic.
    pub fn from_binary(bytes: &[u8]) -> Result<Macaroon, MacaroonError> {
        if bytes.len() > MAX_MACAROON_LEN {
            return Err(MacaroonError::TooLong);
        }
        let mut reader = match bytes.split_first() {
            Some((&VERSION_2, rest)) => Reader { rest },
            Some(_) => return Err(MacaroonError::UnsupportedVersion),
            None => return Err(MacaroonError::Truncated),
        };
        let (location, identifier) = reader.section()?;
        let identifier = identifier.ok_or(MacaroonError::Malformed)?;
        let mut caveats = Vec::new();
        while !reader.at_eos()? {
            if caveats.len() == MAX_CAVEATS {
                return Err(MacaroonError::TooManyCaveats);
            }
            caveats.push(reader.caveat()?);
        }
        let (kind, signature) = reader.field()?;
        let signature = <[u8; 32]>::try_from(signature).map_err(|_| MacaroonError::Malformed)?;
        if kind != field::SIGNATURE || !reader.rest.is_empty() {
            return Err(MacaroonError::Malformed);
        }
        Ok(Macaroon { location: location.unwrap_or_default(), identifier, caveats, signature })
    }
}

fn derived_key(root_key: &[u8]) -> [u8; 32] {
    mac(KEY_GENERATOR, root_key)
}

fn mac(key: &[u8], message: &[u8]) -> [u8; 32] {
    keyed(key, message).finalize().into_bytes().into()
}

/// HMAC-SHA256 under `key`, fed `message`. HMAC takes keys of any length, so construction
/// cannot fail; the fallback keeps this function total without a panic path.
fn keyed(key: &[u8], message: &[u8]) -> HmacSha256 {
    let mut mac =
        HmacSha256::new_from_slice(key).unwrap_or_else(|_| HmacSha256::new(&Default::default()));
    mac.update(message);
    mac
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_field(out: &mut Vec<u8>, kind: u64, data: &[u8]) {
    put_varint(out, kind);
    put_varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

type Section = (Option<Vec<u8>>, Option<Vec<u8>>);

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, MacaroonError> {
        let mut value = 0u64;
        for (i, byte) in self.rest.iter().enumerate().take(10) {
            let bits = u64::from(byte & 0x7f);
            // The tenth byte may carry only the top bit of a u64.
            if i == 9 && bits > 1 {
                return Err(MacaroonError::Malformed);
            }
            value |= bits << (7 * i);
            if byte & 0x80 == 0 {
                self.rest = &self.rest[i + 1..];
                return Ok(value);
            }
        }
        Err(MacaroonError::Truncated)
    }

    /// Consumes an end-of-section marker if one is next.
    fn at_eos(&mut self) -> Result<bool, MacaroonError> {
        match self.rest.first() {
            None => Err(MacaroonError::Truncated),
            Some(0) => {
                self.rest = &self.rest[1..];
                Ok(true)
            }
            Some(_) => Ok(false),
        }
    }

    /// One `type, length, data` field (not EOS).
    fn field(&mut self) -> Result<(u64, &'a [u8]), MacaroonError> {
        let kind = self.varint()?;
        if kind == field::EOS {
            return Err(MacaroonError::Malformed);
        }
        let len = usize::try_from(self.varint()?).map_err(|_| MacaroonError::Truncated)?;
        if len > self.rest.len() {
            return Err(MacaroonError::Truncated);
        }
        let (data, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok((kind, data))
    }

    /// The fields of one section up to its EOS, in increasing type order, each at most once.
    fn fields(&mut self) -> Result<Vec<(u64, &'a [u8])>, MacaroonError> {
        let mut fields: Vec<(u64, &[u8])> = Vec::new();
        while !self.at_eos()? {
            let (kind, data) = self.field()?;
            if fields.last().is_some_and(|(last, _)| *last >= kind) {
                return Err(MacaroonError::Malformed);
            }
            fields.push((kind, data));
        }
        Ok(fields)
    }

    /// The macaroon's own section: `(location, identifier)`, each optional here.
    fn section(&mut self) -> Result<Section, MacaroonError> {
        let mut location = None;
        let mut identifier = None;
        for (kind, data) in self.fields()? {
            match kind {
                field::LOCATION => location = Some(data.to_vec()),
                field::IDENTIFIER => identifier = Some(data.to_vec()),
                _ => return Err(MacaroonError::Malformed),
            }
        }
        Ok((location, identifier))
    }

    fn caveat(&mut self) -> Result<Caveat, MacaroonError> {
        let mut caveat = Caveat::default();
        let mut has_id = false;
        for (kind, data) in self.fields()? {
            match kind {
                field::LOCATION => caveat.location = data.to_vec(),
                field::IDENTIFIER => {
                    caveat.id = data.to_vec();
                    has_id = true;
                }
                field::VID => caveat.verification_id = Some(data.to_vec()),
                _ => return Err(MacaroonError::Malformed),
            }
        }
        if has_id { Ok(caveat) } else { Err(MacaroonError::Malformed) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    /// `../shared/vectors/macaroons-libmacaroons.json`, `readme_chain`.
    #[test]
    fn signature_chain_matches_the_libmacaroons_readme() {
        let mut m = Macaroon::mint(
            b"this is our super secret key; only we should know it",
            b"we used our secret key",
            b"http://mybank/",
        );
        let mut sigs = vec![hex::encode(m.signature())];
        for caveat in
            ["account = 3735928559", "time < 2020-01-01T00:00", "email = alice@example.org"]
        {
            m.add_first_party_caveat(caveat.as_bytes());
            sigs.push(hex::encode(m.signature()));
        }
        assert_eq!(
            sigs,
            [
                "e3d9e02908526c4c0039ae15114115d97fdd68bf2ba379b342aaf0f617d0552f",
                "1efe4763f290dbce0c1d08477367e11f4eee456a64933cf662d79772dbb82128",
                "b5f06c8c8ef92f6c82c6ff282cd1f8bd1849301d09a2db634ba182536a611c49",
                "ddf553e46083e55b8d71ab822be3d8fcf21d6bf19c40d617bb9fb438934474b6",
            ]
        );
    }

    /// `../shared/vectors/macaroons-libmacaroons.json`, `v2_binary`.
    #[test]
    fn v2_binary_vectors_round_trip_and_verify() {
        let vectors = [
            (
                vec![],
                "AgETaHR0cDovL2V4YW1wbGUub3JnLwIFa2V5aWQAAAYgfN7nklEcW8b1KEhYBd_psk54XijiqZMB-dcRxgnjjvc",
                "7cdee792511c5bc6f528485805dfe9b24e785e28e2a99301f9d711c609e38ef7",
            ),
            (
                vec!["account = 3735928559"],
                "AgETaHR0cDovL2V4YW1wbGUub3JnLwIFa2V5aWQAAhRhY2NvdW50ID0gMzczNTkyODU1OQAABiD1SAf23G7fiL8PcwazgiVio2JTPb9zObphdl2kvSWdhw",
                "f54807f6dc6edf88bf0f7306b3822562a362533dbf7339ba61765da4bd259d87",
            ),
            (
                vec!["account = 3735928559", "user = alice"],
                "AgETaHR0cDovL2V4YW1wbGUub3JnLwIFa2V5aWQAAhRhY2NvdW50ID0gMzczNTkyODU1OQACDHVzZXIgPSBhbGljZQAABiBL6WfNHqDGsmuvakqU7psFsViG2guoXoxCqTyNDhJe_A",
                "4be967cd1ea0c6b26baf6a4a94ee9b05b15886da0ba85e8c42a93c8d0e125efc",
            ),
        ];
        for (caveats, encoded, signature) in vectors {
            let mut minted = Macaroon::mint(b"this is the key", b"keyid", b"http://example.org/");
            for caveat in &caveats {
                minted.add_first_party_caveat(caveat.as_bytes());
            }
            assert_eq!(hex::encode(minted.signature()), signature);
            assert_eq!(URL_SAFE_NO_PAD.encode(minted.to_binary()), encoded);

            let read = Macaroon::from_binary(&URL_SAFE_NO_PAD.decode(encoded).unwrap()).unwrap();
            assert_eq!(read, minted);
            let ids: Vec<&[u8]> = caveats.iter().map(|c| c.as_bytes()).collect();
            assert_eq!(read.verify(b"this is the key").unwrap(), ids);
            assert_eq!(read.verify(b"another key"), Err(MacaroonError::BadSignature));
        }
    }

    #[test]
    fn an_empty_location_is_not_written_but_is_read() {
        let m = Macaroon::mint(b"k", b"id", b"");
        let bytes = m.to_binary();
        assert_eq!(&bytes[..5], &[2, 2, 2, b'i', b'd']);
        // pymacaroons writes an empty location field: 01 00.
        let mut with_location = vec![2, 1, 0];
        with_location.extend_from_slice(&bytes[1..]);
        assert_eq!(Macaroon::from_binary(&with_location).unwrap(), m);
    }

    #[test]
    fn removing_or_changing_a_caveat_breaks_the_signature() {
        let mut m = Macaroon::mint(b"root", b"id", b"");
        m.add_first_party_caveat(b"a=1");
        m.add_first_party_caveat(b"b=2");
        let mut dropped = m.clone();
        dropped.caveats.pop();
        assert_eq!(dropped.verify(b"root"), Err(MacaroonError::BadSignature));
        let mut changed = m.clone();
        changed.caveats[0].id = b"a=9".to_vec();
        assert_eq!(changed.verify(b"root"), Err(MacaroonError::BadSignature));
        assert!(m.verify(b"root").is_ok());
    }

    #[test]
    fn malformed_bytes_are_refused_by_kind() {
        let good = {
            let mut m = Macaroon::mint(b"k", b"id", b"loc");
            m.add_first_party_caveat(b"c=1");
            m.to_binary()
        };
        assert_eq!(Macaroon::from_binary(&[]), Err(MacaroonError::Truncated));
        assert_eq!(
            Macaroon::from_binary(b"MDAxY2xvY2F0aW9u"),
            Err(MacaroonError::UnsupportedVersion)
        );
        for cut in 1..good.len() {
            assert!(Macaroon::from_binary(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(Macaroon::from_binary(&trailing), Err(MacaroonError::Malformed));
        // Identifier before location: fields out of order.
        assert_eq!(
            Macaroon::from_binary(&[2, 2, 1, b'x', 1, 1, b'l', 0, 0, 6, 0]),
            Err(MacaroonError::Malformed)
        );
        // A length far past the end.
        assert_eq!(
            Macaroon::from_binary(&[2, 2, 0xff, 0xff, 0xff, 0xff, 0x0f, b'x']),
            Err(MacaroonError::Truncated)
        );
        // A varint that never ends within 10 bytes.
        let mut endless = vec![2, 0x82];
        endless.extend([0xff; 11]);
        assert_eq!(Macaroon::from_binary(&endless), Err(MacaroonError::Malformed));
        assert_eq!(Macaroon::from_binary(&[2; MAX_MACAROON_LEN + 1]), Err(MacaroonError::TooLong));
    }

    fn caveat_bytes() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)
    }

    proptest::proptest! {
        #[test]
        fn every_macaroon_reads_back_as_written(
            location in caveat_bytes(),
            identifier in caveat_bytes(),
            caveats in proptest::collection::vec(caveat_bytes(), 0..MAX_CAVEATS),
        ) {
            let mut m = Macaroon::mint(b"root", &identifier, &location);
            for caveat in &caveats {
                m.add_first_party_caveat(caveat);
            }
            let read = Macaroon::from_binary(&m.to_binary());
            if m.to_binary().len() > MAX_MACAROON_LEN {
                proptest::prop_assert_eq!(read, Err(MacaroonError::TooLong));
            } else {
                let read = read.unwrap();
                proptest::prop_assert_eq!(&read, &m);
                proptest::prop_assert!(read.verify(b"root").is_ok());
            }
        }

        #[test]
        fn any_bytes_give_an_answer(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let mut versioned = vec![VERSION_2];
            versioned.extend_from_slice(&bytes);
            for input in [&bytes, &versioned] {
                if let Ok(m) = Macaroon::from_binary(input) {
                    proptest::prop_assert_eq!(Macaroon::from_binary(&m.to_binary()), Ok(m));
                }
            }
        }
    }

    #[test]
    fn third_party_caveats_are_read_but_never_verify() {
        let mut m = Macaroon::mint(b"k", b"id", b"");
        m.caveats.push(Caveat {
            location: b"https://auth".to_vec(),
            id: b"tp".to_vec(),
            verification_id: Some(vec![7; 64]),
        });
        let read = Macaroon::from_binary(&m.to_binary()).unwrap();
        assert_eq!(read, m);
        assert_eq!(read.verify(b"k"), Err(MacaroonError::ThirdPartyCaveat));
    }
}
