//! JSON Web Tokens (RFC 7519) in compact form: decoding, signature verification
//! (HS256, RS256, ES256) and claim checks. Pure code, no host calls; every error
//! is a [`JwtError`] with an RFC 6750 description and a metric-friendly code.

use std::fmt;

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use serde_json::{Map, Value};

use crate::jwks::{Key, KeySet};

/// base64url, padding optional (some issuers pad).
pub(crate) const B64URL: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A signature algorithm this filter verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    /// HMAC SHA-256.
    Hs256,
    /// RSASSA-PKCS1-v1_5 SHA-256.
    Rs256,
    /// ECDSA P-256 SHA-256.
    Es256,
}

impl Alg {
    /// From the JOSE name; `None` for anything else (`none` included).
    pub fn from_name(name: &str) -> Option<Alg> {
        match name {
            "HS256" => Some(Alg::Hs256),
            "RS256" => Some(Alg::Rs256),
            "ES256" => Some(Alg::Es256),
            _ => None,
        }
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtError {
    /// No token where the rule requires one.
    Missing,
    /// Larger than `max_token_bytes`.
    TooLarge,
    /// Not three base64url segments of JSON.
    Malformed,
    /// `alg` is not HS256, RS256 or ES256.
    UnsupportedAlg,
    /// No key with the token's `kid` (or of its algorithm).
    UnknownKey,
    /// The signature does not verify.
    BadSignature,
    /// `exp` is in the past.
    Expired,
    /// `nbf` is in the future.
    NotYetValid,
    /// `iss` is not a configured issuer.
    BadIssuer,
    /// `aud` has none of the configured audiences.
    BadAudience,
    /// The provider's keys could not be fetched.
    KeysUnavailable,
}

impl JwtError {
    /// A short code for metrics and logs (`expired`, `bad_signature`...).
    pub fn code(self) -> &'static str {
        match self {
            JwtError::Missing => "missing",
            JwtError::TooLarge => "too_large",
            JwtError::Malformed => "malformed",
            JwtError::UnsupportedAlg => "unsupported_alg",
            JwtError::UnknownKey => "unknown_kid",
            JwtError::BadSignature => "bad_signature",
            JwtError::Expired => "expired",
            JwtError::NotYetValid => "not_yet_valid",
            JwtError::BadIssuer => "bad_issuer",
            JwtError::BadAudience => "bad_audience",
            JwtError::KeysUnavailable => "keys_unavailable",
        }
    }

    /// The RFC 6750 `error_description` (plain ASCII, no quotes or backslashes).
    pub fn description(self) -> &'static str {
        match self {
            JwtError::Missing => "Jwt is missing",
            JwtError::TooLarge => "Jwt is too large",
            JwtError::Malformed => "Jwt is not in the form of Header.Payload.Signature",
            JwtError::UnsupportedAlg => "Jwt algorithm is not supported",
            JwtError::UnknownKey => "Jwks doesn't have key to match kid or alg from Jwt",
            JwtError::BadSignature => "Jwt verification fails",
            JwtError::Expired => "Jwt is expired",
            JwtError::NotYetValid => "Jwt not yet valid",
            JwtError::BadIssuer => "Jwt issuer is not configured",
            JwtError::BadAudience => "Audiences in Jwt are not allowed",
            JwtError::KeysUnavailable => "Jwks remote fetch is failed",
        }
    }

    /// Every error, for defining metrics up front.
    pub const ALL: [JwtError; 11] = [
        JwtError::Missing,
        JwtError::TooLarge,
        JwtError::Malformed,
        JwtError::UnsupportedAlg,
        JwtError::UnknownKey,
        JwtError::BadSignature,
        JwtError::Expired,
        JwtError::NotYetValid,
        JwtError::BadIssuer,
        JwtError::BadAudience,
        JwtError::KeysUnavailable,
    ];
}

impl fmt::Display for JwtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.description())
    }
}

impl std::error::Error for JwtError {}

/// A decoded (not yet verified) token.
#[derive(Debug, Clone)]
pub struct Jwt<'a> {
    /// The signature algorithm.
    pub alg: Alg,
    /// The key id, if any.
    pub kid: Option<String>,
    /// The claims object.
    pub claims: Map<String, Value>,
    /// `header.payload`, the signed bytes.
    pub signing_input: &'a str,
    /// The payload segment as sent (base64url).
    pub payload_b64: &'a str,
    /// The raw signature.
    pub signature: Vec<u8>,
}

impl Jwt<'_> {
    /// The `iss` claim.
    pub fn issuer(&self) -> Option<&str> {
        self.claims.get("iss").and_then(Value::as_str)
    }
}

fn json_object(segment: &str) -> Result<Map<String, Value>, JwtError> {
    let bytes = B64URL.decode(segment).map_err(|_| JwtError::Malformed)?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(JwtError::Malformed),
    }
}

/// Splits and decodes a compact JWS. Refuses anything but three non-empty-header
/// segments, JSON objects for header and payload, and a supported `alg`.
pub fn decode(token: &str, max_bytes: usize) -> Result<Jwt<'_>, JwtError> {
    if token.len() > max_bytes {
        return Err(JwtError::TooLarge);
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(JwtError::Malformed);
    };
    if h.is_empty() || p.is_empty() {
        return Err(JwtError::Malformed);
    }
    let header = json_object(h)?;
    let claims = json_object(p)?;
    let alg = header.get("alg").and_then(Value::as_str).ok_or(JwtError::Malformed)?;
    let alg = Alg::from_name(alg).ok_or(JwtError::UnsupportedAlg)?;
    let kid = header.get("kid").and_then(Value::as_str).map(str::to_owned);
    let signature = B64URL.decode(s).map_err(|_| JwtError::Malformed)?;
    let signing_input = &token[..h.len() + 1 + p.len()];
    Ok(Jwt { alg, kid, claims, signing_input, payload_b64: p, signature })
}

/// Verifies the signature with the keys of the token's algorithm whose `kid`
/// matches the token's (keys without a `kid` match any token, and a token without
/// one tries every key of its algorithm).
pub fn verify_signature(jwt: &Jwt<'_>, keys: &KeySet) -> Result<(), JwtError> {
    let candidates: Vec<&Key> = keys
        .keys
        .iter()
        .filter(|k| k.alg() == jwt.alg && (jwt.kid.is_none() || k.kid.is_none() || k.kid == jwt.kid))
        .collect();
    if candidates.is_empty() {
        return Err(JwtError::UnknownKey);
    }
    if candidates.iter().any(|k| k.verify(jwt.signing_input.as_bytes(), &jwt.signature)) {
        Ok(())
    } else {
        Err(JwtError::BadSignature)
    }
}

/// What the claims must satisfy.
#[derive(Debug, Clone)]
pub struct ClaimRules<'a> {
    /// The issuer (`iss` must equal it), if any.
    pub issuer: Option<&'a str>,
    /// Accepted audiences; empty = `aud` is not checked.
    pub audiences: &'a [String],
    /// Seconds since the epoch.
    pub now: u64,
    /// Allowed clock skew in seconds for `exp` and `nbf`.
    pub skew: u64,
}

fn numeric(claims: &Map<String, Value>, name: &str) -> Result<Option<f64>, JwtError> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_f64().filter(|n| n.is_finite()).map(Some).ok_or(JwtError::Malformed),
    }
}

/// Checks `iss`, `aud`, `exp` and `nbf`.
pub fn validate_claims(claims: &Map<String, Value>, rules: &ClaimRules<'_>) -> Result<(), JwtError> {
    if let Some(want) = rules.issuer
        && claims.get("iss").and_then(Value::as_str) != Some(want)
    {
        return Err(JwtError::BadIssuer);
    }
    let now = rules.now as f64;
    let skew = rules.skew as f64;
    if let Some(exp) = numeric(claims, "exp")?
        && now > exp + skew
    {
        return Err(JwtError::Expired);
    }
    if let Some(nbf) = numeric(claims, "nbf")?
        && now + skew < nbf
    {
        return Err(JwtError::NotYetValid);
    }
    if !rules.audiences.is_empty() {
        let ok = match claims.get("aud") {
            Some(Value::String(a)) => rules.audiences.iter().any(|w| w == a),
            Some(Value::Array(list)) => {
                list.iter().filter_map(Value::as_str).any(|a| rules.audiences.iter().any(|w| w == a))
            }
            _ => false,
        };
        if !ok {
            return Err(JwtError::BadAudience);
        }
    }
    Ok(())
}

/// Reads a claim by a dotted path (`realm_access.roles`) and renders it as a header
/// value: strings as is, numbers and booleans as text, arrays of scalars joined with
/// `,`, objects as JSON. `None` when absent or when the rendering holds a control
/// character (a header injection attempt).
pub fn claim_header_value(claims: &Map<String, Value>, path: &str) -> Option<String> {
    let mut parts = path.split('.');
    let mut value = claims.get(parts.next()?)?;
    for part in parts {
        value = value.as_object()?.get(part)?;
    }
    let text = match value {
        Value::Null => return None,
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Array(items) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect::<Vec<_>>()
            .join(","),
        Value::Object(_) => value.to_string(),
    };
    if text.chars().any(|c| c.is_control()) { None } else { Some(text) }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::jwks;

    fn b64(v: &[u8]) -> String {
        B64URL.encode(v).trim_end_matches('=').to_string()
    }

    fn hs_token(header: &Value, claims: &Value, secret: &[u8]) -> String {
        use hmac::{Hmac, KeyInit, Mac};
        let input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
        mac.update(input.as_bytes());
        format!("{input}.{}", b64(&mac.finalize().into_bytes()))
    }

    fn oct_keys(secret: &[u8]) -> KeySet {
        let doc = json!({"keys": [{"kty": "oct", "kid": "k1", "k": b64(secret)}]});
        jwks::parse(doc.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn hs256_round_trip_and_tamper() {
        let keys = oct_keys(b"0123456789abcdef0123456789abcdef");
        let t = hs_token(
            &json!({"alg": "HS256", "kid": "k1"}),
            &json!({"sub": "a"}),
            b"0123456789abcdef0123456789abcdef",
        );
        let jwt = decode(&t, 8192).unwrap();
        assert_eq!(verify_signature(&jwt, &keys), Ok(()));
        let bad = hs_token(&json!({"alg": "HS256", "kid": "k1"}), &json!({"sub": "a"}), b"other");
        assert_eq!(verify_signature(&decode(&bad, 8192).unwrap(), &keys), Err(JwtError::BadSignature));
        let other_kid = hs_token(&json!({"alg": "HS256", "kid": "k2"}), &json!({}), b"x");
        assert_eq!(verify_signature(&decode(&other_kid, 8192).unwrap(), &keys), Err(JwtError::UnknownKey));
    }

    #[test]
    fn decode_refuses_bad_shapes() {
        let h = b64(br#"{"alg":"HS256"}"#);
        let p = b64(br#"{"sub":"x"}"#);
        assert_eq!(decode("a.b", 99).unwrap_err(), JwtError::Malformed);
        assert_eq!(decode(&format!("{h}.{p}.AA.x"), 999).unwrap_err(), JwtError::Malformed);
        assert_eq!(decode(&format!(".{p}.AA"), 999).unwrap_err(), JwtError::Malformed);
        assert_eq!(decode(&format!("{h}.{}.AA", b64(b"[1]")), 999).unwrap_err(), JwtError::Malformed);
        assert_eq!(decode(&format!("{h}.{p}.!!"), 999).unwrap_err(), JwtError::Malformed);
        let none = b64(br#"{"alg":"none"}"#);
        assert_eq!(decode(&format!("{none}.{p}."), 999).unwrap_err(), JwtError::UnsupportedAlg);
        assert_eq!(decode(&"a".repeat(100), 50).unwrap_err(), JwtError::TooLarge);
        // Padded segments are accepted.
        let padded = B64URL.encode(br#"{"alg":"HS256"}"#);
        assert!(decode(&format!("{padded}.{p}.AA"), 999).is_ok());
    }

    #[test]
    fn claims_are_checked_with_skew() {
        let aud = vec!["api".to_string()];
        let rules = ClaimRules { issuer: Some("iss1"), audiences: &aud, now: 1000, skew: 60 };
        let ok = json!({"iss": "iss1", "aud": ["x", "api"], "exp": 1050, "nbf": 1030});
        assert_eq!(validate_claims(ok.as_object().unwrap(), &rules), Ok(()));
        let check = |v: Value| validate_claims(v.as_object().unwrap(), &rules);
        assert_eq!(check(json!({"iss": "iss1", "aud": "api", "exp": 939})), Err(JwtError::Expired));
        assert_eq!(check(json!({"iss": "iss1", "aud": "api", "exp": 940})), Ok(()));
        assert_eq!(check(json!({"iss": "iss1", "aud": "api", "nbf": 1061})), Err(JwtError::NotYetValid));
        assert_eq!(check(json!({"iss": "iss2", "aud": "api"})), Err(JwtError::BadIssuer));
        assert_eq!(check(json!({"iss": "iss1", "aud": "web"})), Err(JwtError::BadAudience));
        assert_eq!(check(json!({"iss": "iss1"})), Err(JwtError::BadAudience));
        assert_eq!(check(json!({"iss": "iss1", "aud": "api", "exp": "soon"})), Err(JwtError::Malformed));
    }

    #[test]
    fn claim_values_render_as_headers() {
        let c = json!({"sub": "alice", "n": 3, "ok": true, "roles": ["a", "b"], "org": {"id": "o1"}, "evil": "x\r\ny: z"});
        let c = c.as_object().unwrap();
        assert_eq!(claim_header_value(c, "sub").as_deref(), Some("alice"));
        assert_eq!(claim_header_value(c, "n").as_deref(), Some("3"));
        assert_eq!(claim_header_value(c, "ok").as_deref(), Some("true"));
        assert_eq!(claim_header_value(c, "roles").as_deref(), Some("a,b"));
        assert_eq!(claim_header_value(c, "org.id").as_deref(), Some("o1"));
        assert_eq!(claim_header_value(c, "org").as_deref(), Some(r#"{"id":"o1"}"#));
        assert_eq!(claim_header_value(c, "evil"), None);
        assert_eq!(claim_header_value(c, "nope.x"), None);
    }

    proptest! {
        #[test]
        fn decode_never_panics(token in ".{0,300}") {
            let _ = decode(&token, 8192);
        }

        #[test]
        fn decode_never_panics_on_dotted_base64(a in "[A-Za-z0-9_=-]{0,60}", b in "[A-Za-z0-9_=-]{0,60}", c in "[A-Za-z0-9_=-]{0,90}") {
            let token = format!("{a}.{b}.{c}");
            if let Ok(jwt) = decode(&token, 8192) {
                let keys = oct_keys(b"k");
                let _ = verify_signature(&jwt, &keys);
            }
        }

        #[test]
        fn any_json_payload_decodes_or_errors(payload in proptest::collection::vec(any::<u8>(), 0..120)) {
            let token = format!("{}.{}.AA", b64(br#"{"alg":"ES256"}"#), b64(&payload));
            match decode(&token, 8192) {
                Ok(jwt) => {
                    let rules = ClaimRules { issuer: Some("i"), audiences: &[], now: 0, skew: 0 };
                    let _ = validate_claims(&jwt.claims, &rules);
                    let _ = claim_header_value(&jwt.claims, "a.b");
                }
                Err(e) => prop_assert_eq!(e, JwtError::Malformed),
            }
        }

        #[test]
        fn valid_hs256_tokens_verify(sub in ".{0,40}", secret in proptest::collection::vec(any::<u8>(), 1..64)) {
            let t = hs_token(&json!({"alg": "HS256"}), &json!({"sub": sub}), &secret);
            let jwt = decode(&t, 8192).unwrap();
            prop_assert_eq!(jwt.claims.get("sub").and_then(Value::as_str), Some(sub.as_str()));
            prop_assert_eq!(verify_signature(&jwt, &oct_keys(&secret)), Ok(()));
        }

        #[test]
        fn flipped_signature_bits_fail(flip in 0usize..256) {
            let secret = b"secret-secret-secret";
            let t = hs_token(&json!({"alg": "HS256"}), &json!({"sub": "x"}), secret);
            let mut jwt = decode(&t, 8192).unwrap();
            let i = flip / 8 % jwt.signature.len();
            jwt.signature[i] ^= 1 << (flip % 8);
            prop_assert_eq!(verify_signature(&jwt, &oct_keys(secret)), Err(JwtError::BadSignature));
        }
    }
}
