//! Minting JWTs and JWKs with the crates the filter verifies them with: HS256,
//! RS256 (a fixed 2048-bit key, `../keys/rsa2048.der`) and ES256 (P-256 keys from a
//! seed byte). Shared by this crate's test-kit tests and the proxy's end-to-end
//! tests (`tests/filters_e2e.rs`, through `#[path]`).
#![allow(dead_code, clippy::unwrap_used)]

use base64::Engine as _;
use serde_json::{Value, json};

pub fn b64(v: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

pub fn signing_input(header: &Value, claims: &Value) -> String {
    format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()))
}

pub fn hs256(kid: &str, claims: &Value, secret: &[u8]) -> String {
    use hmac::{Hmac, KeyInit, Mac};
    let input = signing_input(&json!({"alg": "HS256", "typ": "JWT", "kid": kid}), claims);
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(input.as_bytes());
    format!("{input}.{}", b64(&mac.finalize().into_bytes()))
}

pub fn rsa_key() -> rsa::PrivateKey {
    use rsa::pkcs1::DecodeRsaPrivateKey;
    rsa::PrivateKey::from_pkcs1_der(include_bytes!("../keys/rsa2048.der")).unwrap()
}

pub fn rs256(kid: &str, claims: &Value) -> String {
    use rsa::signature::{SignatureEncoding, Signer};
    let input = signing_input(&json!({"alg": "RS256", "kid": kid}), claims);
    let key = rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(rsa_key());
    format!("{input}.{}", b64(&key.sign(input.as_bytes()).to_vec()))
}

pub fn ec_key(seed: u8) -> p256::ecdsa::SigningKey {
    p256::ecdsa::SigningKey::from_slice(&[seed; 32]).unwrap()
}

pub fn es256(kid: &str, claims: &Value, seed: u8) -> String {
    use p256::ecdsa::signature::Signer;
    let input = signing_input(&json!({"alg": "ES256", "kid": kid}), claims);
    let sig: p256::ecdsa::Signature = ec_key(seed).sign(input.as_bytes());
    format!("{input}.{}", b64(&sig.to_bytes()))
}

pub fn rsa_jwk(kid: &str) -> Value {
    use rsa::traits::PublicKeyParts;
    let public = rsa_key().to_public_key();
    json!({"kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig",
           "n": b64(&public.n().to_be_bytes_trimmed_vartime()), "e": b64(&public.e().to_be_bytes_trimmed_vartime())})
}

pub fn ec_jwk(kid: &str, seed: u8) -> Value {
    let point = ec_key(seed).verifying_key().to_sec1_point(false);
    let point = point.as_bytes();
    json!({"kty": "EC", "crv": "P-256", "kid": kid, "x": b64(&point[1..33]), "y": b64(&point[33..65])})
}
