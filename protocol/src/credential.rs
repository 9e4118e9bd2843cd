//! The `Authorization` header: which paystile credential, if any, a request carries.
//!
//! Parsing works on raw bytes because proxy-wasm hosts hand over whatever the client sent,
//! and any bytes must give an answer (never a panic).

/// The longest `Authorization` value accepted; real Pay Tokens are well under 2 KiB.
pub const MAX_AUTHORIZATION_LEN: usize = 8 * 1024;

/// A credential paystile understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Credential<'a> {
    /// `Authorization: Bearer <Pay Token>`.
    Bearer(&'a str),
    /// `Authorization: L402 <base64 macaroon>:<hex preimage>` (or the older `LSAT`).
    L402 { macaroon: &'a str, preimage: &'a str },
}

/// An `Authorization` header that names a paystile scheme but cannot be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialError {
    TooLong,
    Empty,
    /// Bytes a token cannot contain (controls, spaces, non-ASCII).
    Malformed,
}

/// Reads an `Authorization` value. `Ok(None)` means "no paystile credential": another
/// scheme (Basic, Digest, ...) that the gateway answers with a payment challenge.
pub fn parse_authorization(value: &[u8]) -> Result<Option<Credential<'_>>, CredentialError> {
    if value.len() > MAX_AUTHORIZATION_LEN {
        return Err(CredentialError::TooLong);
    }
    let value = trim_ascii_whitespace(value);
    let scheme_end = value.iter().position(|b| *b == b' ').unwrap_or(value.len());
    let (scheme, rest) = value.split_at(scheme_end);
    let is_l402 = scheme.eq_ignore_ascii_case(b"l402") || scheme.eq_ignore_ascii_case(b"lsat");
    if !is_l402 && !scheme.eq_ignore_ascii_case(b"bearer") {
        return Ok(None);
    }
    let token = trim_ascii_whitespace(rest);
    if token.is_empty() {
        return Err(CredentialError::Empty);
    }
    // RFC 6750 b64token characters: a JWT and a base64 macaroon use subsets of them.
    let b64token = |b: &u8| b.is_ascii_alphanumeric() || b"-._~+/=".contains(b);
    if !is_l402 {
        return read_token(token, b64token).map(|t| Some(Credential::Bearer(t)));
    }
    let (macaroon, preimage) = match token.iter().rposition(|b| *b == b':') {
        Some(colon) => (&token[..colon], &token[colon + 1..]),
        None => return Err(CredentialError::Malformed),
    };
    if macaroon.is_empty() || preimage.is_empty() {
        return Err(CredentialError::Empty);
    }
    Ok(Some(Credential::L402 {
        macaroon: read_token(macaroon, b64token)?,
        preimage: read_token(preimage, u8::is_ascii_hexdigit)?,
    }))
}

fn read_token(bytes: &[u8], allowed: impl Fn(&u8) -> bool) -> Result<&str, CredentialError> {
    if !bytes.iter().all(allowed) {
        return Err(CredentialError::Malformed);
    }
    core::str::from_utf8(bytes).map_err(|_| CredentialError::Malformed)
}

fn trim_ascii_whitespace(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(bytes.len());
    let end = bytes.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(start, |i| i + 1);
    &bytes[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_bearer_tokens_case_insensitively() {
        assert_eq!(parse_authorization(b"Bearer a.b.c"), Ok(Some(Credential::Bearer("a.b.c"))));
        assert_eq!(parse_authorization(b"bearer   a.b.c  "), Ok(Some(Credential::Bearer("a.b.c"))));
        assert_eq!(parse_authorization(b"BEARER x-_"), Ok(Some(Credential::Bearer("x-_"))));
    }

    #[test]
    fn other_schemes_are_not_ours() {
        assert_eq!(parse_authorization(b"Basic dXNlcjpwYXNz"), Ok(None));
        assert_eq!(parse_authorization(b"Bearerx a.b.c"), Ok(None));
        assert_eq!(parse_authorization(b""), Ok(None));
        assert_eq!(parse_authorization(&[0xff, 0x00, 0x80]), Ok(None));
    }

    #[test]
    fn unreadable_bearer_values_are_errors() {
        assert_eq!(parse_authorization(b"Bearer"), Err(CredentialError::Empty));
        assert_eq!(parse_authorization(b"Bearer    "), Err(CredentialError::Empty));
        assert_eq!(parse_authorization(b"Bearer a b"), Err(CredentialError::Malformed));
        assert_eq!(parse_authorization(b"Bearer a\x00b"), Err(CredentialError::Malformed));
        assert_eq!(parse_authorization(b"Bearer \xc3\xa9"), Err(CredentialError::Malformed));
        let long = [b"Bearer ".as_slice(), &[b'a'; MAX_AUTHORIZATION_LEN]].concat();
        assert_eq!(parse_authorization(&long), Err(CredentialError::TooLong));
    }

    #[test]
    fn reads_l402_and_lsat_credentials() {
        let l402 = |macaroon, preimage| Ok(Some(Credential::L402 { macaroon, preimage }));
        assert_eq!(parse_authorization(b"L402 AgE+/w==:0aF9"), l402("AgE+/w==", "0aF9"));
        assert_eq!(parse_authorization(b"lsat  AgE-_w:00 "), l402("AgE-_w", "00"));
        for bad in [&b"L402 AgE"[..], b"L402 AgE:", b"L402 :00", b"L402 Ag E:00", b"L402 AgE:0g"] {
            assert!(parse_authorization(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(parse_authorization(b"L402"), Err(CredentialError::Empty));
        assert_eq!(parse_authorization(b"L402 \t "), Err(CredentialError::Empty));
    }
}
