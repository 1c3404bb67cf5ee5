//! The `xds.*` properties that come from the config (probed on Envoy 1.40):
//! the proxy's identity (`node`) and the metadata of the request's route,
//! virtual host and cluster.
//!
//! - `xds.node`: the node as a serialized `envoy.config.core.v3.Node`;
//! - `xds.node.id`, `.cluster`, `.user_agent_name` (`sluice`),
//!   `.user_agent_version`: text;
//! - `xds.{route,virtual_host,cluster}_metadata`: a serialized
//!   `envoy.config.core.v3.Metadata`; `….filter_metadata`: pairs of each
//!   namespace and its mapping;
//! - `xds.node.metadata` and `….filter_metadata.<namespace>`, and anything
//!   below them: the value found by walking the keys (a mapping's by key, a
//!   list's by index), in Envoy's encoding of
//!   a `google.protobuf.Value`: a string raw, a number as an f64 (8 bytes
//!   LE), a bool as 1 byte, a mapping as pairs (each value encoded so), a
//!   list as pairs of each element and an empty value, null as nothing.

use std::collections::BTreeMap;

use prost::Message;
use serde_json::{Map, Value};
use sluice_config::{Metadata, Node};

const USER_AGENT_NAME: &str = "sluice";
const USER_AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// `envoy.config.core.v3.Node`, the fields Sluice fills.
#[derive(Clone, PartialEq, prost::Message)]
struct NodeProto {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(string, tag = "2")]
    cluster: String,
    #[prost(message, optional, tag = "3")]
    metadata: Option<prost_types::Struct>,
    #[prost(string, tag = "6")]
    user_agent_name: String,
    #[prost(string, tag = "7")]
    user_agent_version: String,
}

/// `envoy.config.core.v3.Metadata`, without its typed part.
#[derive(Clone, PartialEq, prost::Message)]
struct MetadataProto {
    #[prost(btree_map = "string, message", tag = "1")]
    filter_metadata: BTreeMap<String, prost_types::Struct>,
}

/// Writes the metadata property at `path` (the segments after
/// `xds.<…>_metadata`) into `out`; `false` when there is no such property
/// (or no metadata).
pub(crate) fn metadata(m: Option<&Metadata>, path: &[&str], out: &mut Vec<u8>) -> bool {
    let Some(m) = m else { return false };
    match path {
        [] => {
            let filter_metadata =
                m.filter_metadata.iter().map(|(ns, s)| (ns.clone(), to_struct(s))).collect();
            MetadataProto { filter_metadata }.encode(out).is_ok()
        }
        ["filter_metadata"] => {
            encode_pairs(m.filter_metadata.iter().map(|(ns, s)| (ns.as_str(), encoded_map(s))), out);
            true
        }
        ["filter_metadata", ns, keys @ ..] => m.filter_metadata.get(*ns).is_some_and(|s| walk(s, keys, out)),
        _ => false,
    }
}

/// Writes the value at `keys` below `map` (the whole map when there are none).
fn walk(map: &Map<String, Value>, keys: &[&str], out: &mut Vec<u8>) -> bool {
    let Some((first, rest)) = keys.split_first() else {
        encode_map(map, out);
        return true;
    };
    // Mappings by key, lists by index (as Envoy walks them).
    let found = rest.iter().try_fold(map.get(*first), |v, key| match v {
        Some(Value::Object(m)) => Some(m.get(*key)),
        Some(Value::Array(items)) => Some(key.parse::<usize>().ok().and_then(|i| items.get(i))),
        _ => None,
    });
    match found.flatten() {
        Some(v) => {
            encode(v, out);
            true
        }
        None => false,
    }
}

/// Writes the node property at `path` (the segments after `xds.node`) into
/// `out`; `false` when there is no such property.
pub(crate) fn node(node: &Node, path: &[&str], out: &mut Vec<u8>) -> bool {
    let text = |out: &mut Vec<u8>, s: &str| {
        out.extend_from_slice(s.as_bytes());
        true
    };
    match path {
        [] => {
            let proto = NodeProto {
                id: node.id.clone(),
                cluster: node.cluster.clone(),
                metadata: Some(to_struct(&node.metadata)),
                user_agent_name: USER_AGENT_NAME.to_owned(),
                user_agent_version: USER_AGENT_VERSION.to_owned(),
            };
            proto.encode(out).is_ok()
        }
        ["id"] => text(out, &node.id),
        ["cluster"] => text(out, &node.cluster),
        ["user_agent_name"] => text(out, USER_AGENT_NAME),
        ["user_agent_version"] => text(out, USER_AGENT_VERSION),
        ["metadata", keys @ ..] => walk(&node.metadata, keys, out),
        _ => false,
    }
}

/// Envoy's encoding of a metadata value (see the module docs).
fn encode(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Null => {}
        Value::Bool(b) => out.push(u8::from(*b)),
        Value::Number(n) => out.extend_from_slice(&n.as_f64().unwrap_or(0.0).to_le_bytes()),
        Value::String(s) => out.extend_from_slice(s.as_bytes()),
        Value::Object(m) => encode_map(m, out),
        Value::Array(items) => {
            let keys: Vec<Vec<u8>> = items.iter().map(encoded).collect();
            out.extend_from_slice(&sluice_abi::pairs::encode(keys.iter().map(|k| (k, b""))));
        }
    }
}

fn encoded(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    encode(v, &mut out);
    out
}

fn encode_map(m: &Map<String, Value>, out: &mut Vec<u8>) {
    encode_pairs(m.iter().map(|(k, v)| (k.as_str(), encoded(v))), out);
}

fn encoded_map(m: &Map<String, Value>) -> Vec<u8> {
    let mut out = Vec::new();
    encode_map(m, &mut out);
    out
}

/// Writes `(key, encoded value)` pairs in the ABI's map encoding.
fn encode_pairs<'a>(items: impl Iterator<Item = (&'a str, Vec<u8>)>, out: &mut Vec<u8>) {
    let values: Vec<(&str, Vec<u8>)> = items.collect();
    out.extend_from_slice(&sluice_abi::pairs::encode(values.iter().map(|(k, v)| (k, v))));
}

fn to_struct(m: &Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct { fields: m.iter().map(|(k, v)| (k.clone(), to_value(v))).collect() }
}

fn to_value(v: &Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Object(m) => Kind::StructValue(to_struct(m)),
        Value::Array(items) => {
            Kind::ListValue(prost_types::ListValue { values: items.iter().map(to_value).collect() })
        }
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn test_node() -> Node {
        let metadata = serde_json::json!({
            "team": "edge", "n": 3, "b": true, "nested": {"x": "y"}, "list": ["a", "b"], "none": null
        });
        let metadata = metadata.as_object().cloned().unwrap_or_default();
        Node { id: "node-1".into(), cluster: "mesh-a".into(), metadata }
    }

    fn get(path: &[&str]) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        super::node(&test_node(), path, &mut out).then_some(out)
    }

    #[test]
    fn leaves_are_encoded_as_envoy_does() {
        assert_eq!(get(&["id"]).unwrap(), b"node-1");
        assert_eq!(get(&["cluster"]).unwrap(), b"mesh-a");
        assert_eq!(get(&["metadata", "team"]).unwrap(), b"edge");
        assert_eq!(get(&["metadata", "n"]).unwrap(), 3.0f64.to_le_bytes());
        assert_eq!(get(&["metadata", "b"]).unwrap(), [1]);
        assert_eq!(get(&["metadata", "nested", "x"]).unwrap(), b"y");
        assert_eq!(get(&["metadata", "list", "1"]).unwrap(), b"b");
        assert_eq!(get(&["metadata", "list", "2"]), None);
        assert_eq!(get(&["metadata", "list", "x"]), None);
        assert_eq!(get(&["metadata", "none"]).unwrap(), b"");
        assert_eq!(get(&["metadata", "nope"]), None);
        assert_eq!(get(&["metadata", "team", "x"]), None);
        assert_eq!(get(&["id", "x"]), None);
        assert_eq!(get(&["locality"]), None);
    }

    #[test]
    fn mappings_and_lists_are_pairs() {
        // Envoy 1.40's bytes for `nested: {x: y}`'s shape, and for `[a, b]`.
        let nested = get(&["metadata", "nested"]).unwrap();
        let pairs = sluice_abi::pairs::decode(&nested).unwrap();
        assert_eq!(pairs, vec![(&b"x"[..], &b"y"[..])]);
        let list = get(&["metadata", "list"]).unwrap();
        assert_eq!(list, b"\x02\0\0\0\x01\0\0\0\0\0\0\0\x01\0\0\0\0\0\0\0a\0\0b\0\0");
        let all = get(&["metadata"]).unwrap();
        assert_eq!(sluice_abi::pairs::decode(&all).unwrap().len(), 6);
    }

    #[test]
    fn the_whole_node_is_a_serialized_node_message() {
        let bytes = get(&[]).unwrap();
        let proto = NodeProto::decode(&bytes[..]).unwrap();
        assert_eq!((proto.id.as_str(), proto.cluster.as_str()), ("node-1", "mesh-a"));
        assert_eq!(proto.user_agent_name, "sluice");
        let fields = proto.metadata.unwrap().fields;
        assert_eq!(fields["team"].kind, Some(prost_types::value::Kind::StringValue("edge".into())));
    }

    #[test]
    fn metadata_is_walked_by_namespace_then_keys() {
        let ns = serde_json::json!({"role": "admin", "level": 2});
        let mut m = Metadata::default();
        m.filter_metadata.insert("acme.auth".into(), ns.as_object().cloned().unwrap_or_default());
        let get = |path: &[&str]| {
            let mut out = Vec::new();
            metadata(Some(&m), path, &mut out).then_some(out)
        };
        assert_eq!(get(&["filter_metadata", "acme.auth", "role"]).unwrap(), b"admin");
        assert_eq!(get(&["filter_metadata", "acme.auth", "level"]).unwrap(), 2.0f64.to_le_bytes());
        assert_eq!(get(&["filter_metadata", "acme.auth", "nope"]), None);
        assert_eq!(get(&["filter_metadata", "other"]), None);
        let namespaces = get(&["filter_metadata"]).unwrap();
        let pairs = sluice_abi::pairs::decode(&namespaces).unwrap();
        assert_eq!(pairs.len(), 1);
        assert_eq!(pairs[0].0, b"acme.auth");
        assert_eq!(sluice_abi::pairs::decode(pairs[0].1).unwrap().len(), 2);
        // The whole: the same message as Envoy 1.40's bytes for this metadata
        // (probed; Envoy's map order is its own).
        let envoy = hex::decode(
            "0a320a0961636d652e6175746812250a0f0a04726f6c6512071a0561646d696e0a120a056c6576656c1209110000000000000040",
        )
        .unwrap();
        let whole = get(&[]).unwrap();
        assert_eq!(whole.len(), envoy.len());
        assert_eq!(MetadataProto::decode(&whole[..]).unwrap(), MetadataProto::decode(&envoy[..]).unwrap());
        assert_eq!(get(&["nope"]), None);
        assert!(!metadata(None, &[], &mut Vec::new()));
    }
}
