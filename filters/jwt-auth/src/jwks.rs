//! JSON Web Key Sets (RFC 7517): `oct` (HS256), `RSA` (RS256) and `EC` P-256
//! (ES256) keys, parsed into verifiers. Keys of other types, curves or uses are
//! skipped, not errors.

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use sha2::Sha256;

use crate::jwt::{Alg, B64URL};

/// A verification key.
pub enum Material {
    /// An HMAC secret.
    Hmac(Vec<u8>),
    /// An RSA public key (PKCS#1 v1.5, SHA-256).
    Rsa(Box<rsa::pkcs1v15::VerifyingKey<Sha256>>),
    /// A P-256 public key.
    Ec(Box<p256::ecdsa::VerifyingKey>),
}

/// One key of a set.
pub struct Key {
    /// The key id (`kid`).
    pub kid: Option<String>,
    /// The key itself.
    pub material: Material,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material (HMAC secrets).
        f.debug_struct("Key").field("kid", &self.kid).field("alg", &self.alg()).finish_non_exhaustive()
    }
}

impl Key {
    /// The algorithm the key verifies.
    pub fn alg(&self) -> Alg {
        match self.material {
            Material::Hmac(_) => Alg::Hs256,
            Material::Rsa(_) => Alg::Rs256,
            Material::Ec(_) => Alg::Es256,
        }
    }

    /// Verifies `signature` over `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        match &self.material {
            Material::Hmac(secret) => {
                let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else { return false };
                mac.update(message);
                // Constant-time comparison.
                mac.verify_slice(signature).is_ok()
            }
            Material::Rsa(key) => {
                use rsa::signature::Verifier;
                let Ok(sig) = rsa::pkcs1v15::Signature::try_from(signature) else { return false };
                key.verify(message, &sig).is_ok()
            }
            Material::Ec(key) => {
                use p256::ecdsa::signature::Verifier;
                // JWS ES256 signatures are raw r || s, 64 bytes.
                let Ok(sig) = p256::ecdsa::Signature::from_slice(signature) else { return false };
                key.verify(message, &sig).is_ok()
            }
        }
    }
}

/// A parsed key set.
#[derive(Debug, Default)]
pub struct KeySet {
    /// The usable keys.
    pub keys: Vec<Key>,
    /// How many keys of the document were skipped (unsupported or invalid).
    pub skipped: usize,
}

#[derive(Deserialize)]
struct Doc {
    keys: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct Jwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default, rename = "use")]
    use_: Option<String>,
    #[serde(default)]
    k: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

fn b64(field: Option<&String>) -> Option<Vec<u8>> {
    B64URL.decode(field?).ok()
}

fn material(jwk: &Jwk) -> Option<Material> {
    if jwk.use_.as_deref().is_some_and(|u| u != "sig") {
        return None;
    }
    let alg = jwk.alg.as_deref();
    match jwk.kty.as_str() {
        "oct" if alg.is_none_or(|a| a == "HS256") => {
            let k = b64(jwk.k.as_ref())?;
            (!k.is_empty()).then_some(Material::Hmac(k))
        }
        "RSA" if alg.is_none_or(|a| a == "RS256") => {
            let n = b64(jwk.n.as_ref())?;
            let e = b64(jwk.e.as_ref())?;
            // At most 4096-bit moduli and 64-bit exponents: bigger is a denial of
            // service, not a key.
            if n.len() > 512 || n.len() < 128 || e.is_empty() || e.len() > 8 {
                return None;
            }
            let key = rsa::PublicKey::new(
                rsa::BoxedUint::from_be_slice_vartime(&n),
                rsa::BoxedUint::from_be_slice_vartime(&e),
            )
            .ok()?;
            Some(Material::Rsa(Box::new(rsa::pkcs1v15::VerifyingKey::new(key))))
        }
        "EC" if jwk.crv.as_deref() == Some("P-256") && alg.is_none_or(|a| a == "ES256") => {
            let x = b64(jwk.x.as_ref())?;
            let y = b64(jwk.y.as_ref())?;
            if x.len() != 32 || y.len() != 32 {
                return None;
            }
            let mut point = Vec::with_capacity(65);
            point.push(4);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            p256::ecdsa::VerifyingKey::from_sec1_bytes(&point).ok().map(|k| Material::Ec(Box::new(k)))
        }
        _ => None,
    }
}

/// Parses a JWKS document. Errors only when it is not a JWKS at all, or holds no
/// usable key.
pub fn parse(bytes: &[u8]) -> Result<KeySet, String> {
    let doc: Doc = serde_json::from_slice(bytes).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut set = KeySet::default();
    for value in doc.keys {
        let parsed = serde_json::from_value::<Jwk>(value).ok().and_then(|jwk| {
            let m = material(&jwk)?;
            Some(Key { kid: jwk.kid, material: m })
        });
        match parsed {
            Some(k) => set.keys.push(k),
            None => set.skipped += 1,
        }
    }
    if set.keys.is_empty() {
        return Err(format!("no usable key in the JWKS ({} skipped)", set.skipped));
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    #[test]
    fn skips_what_it_cannot_use() {
        let doc = json!({"keys": [
            {"kty": "oct", "k": "c2VjcmV0"},
            {"kty": "oct", "k": "c2VjcmV0", "use": "enc"},
            {"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA"},
            {"kty": "RSA", "n": "AQAB", "e": "AQAB"},
            {"kty": "OKP"},
            "not an object",
        ]});
        let set = parse(doc.to_string().as_bytes()).unwrap();
        assert_eq!(set.keys.len(), 1);
        assert_eq!(set.skipped, 5);
        assert!(parse(br#"{"keys": []}"#).unwrap_err().contains("no usable key"));
        assert!(parse(b"[]").unwrap_err().contains("not a JWKS"));
    }

    #[test]
    fn debug_never_shows_secrets() {
        let set = parse(br#"{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "a"}]}"#).unwrap();
        let text = format!("{:?}", set);
        assert!(!text.contains("secret") && !text.contains("115"), "{text}");
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn hostile_keys_never_panic(kty in "(oct|RSA|EC)", n in "[A-Za-z0-9_-]{0,400}", e in "[A-Za-z0-9_-]{0,12}", x in "[A-Za-z0-9_-]{0,44}", y in "[A-Za-z0-9_-]{0,44}") {
            let doc = json!({"keys": [{"kty": kty, "n": n, "e": e, "k": n, "crv": "P-256", "x": x, "y": y}]});
            if let Ok(set) = parse(doc.to_string().as_bytes()) {
                for k in &set.keys {
                    let _ = k.verify(b"msg", &[0u8; 64]);
                    let _ = k.verify(b"msg", &[]);
                }
            }
        }
    }
}
