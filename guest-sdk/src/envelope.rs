//! The envelope around canonical state bytes.
//!
//! Layout (all integers little-endian):
//!
//! | offset | size | field                                             |
//! |--------|------|---------------------------------------------------|
//! | 0      | 4    | magic `b"MGST"`                                   |
//! | 4      | 1    | envelope version, currently 1                     |
//! | 5      | 1    | encoding, 1 = MessagePack with field names        |
//! | 6      | 4    | state version (`Operator::STATE_VERSION`)         |
//! | 10     | ..   | payload                                           |
//!
//! The envelope is what lets a newer operator tell an old snapshot apart
//! and refuse one it cannot read, instead of misreading it.

use std::io;

use crate::Error;
use serde::Serialize;
use serde::de::DeserializeOwned;

const MAGIC: &[u8; 4] = b"MGST";
const ENVELOPE_VERSION: u8 = 1;
const HEADER_LEN: usize = 10;

/// Encoding byte for MessagePack with field names (self-describing: fields
/// are matched by name, so added fields with defaults and removed fields
/// are tolerated).
pub const STATE_ENCODING_MSGPACK: u8 = 1;

/// Serialize `state` into the SDK's envelope, tagged with `version`, into
/// `out` as it goes (the state is never held serialized whole).
///
/// # Errors
/// When serde fails to serialize the state or `out` refuses it.
pub fn write_state<T: Serialize + ?Sized>(
    out: &mut impl io::Write,
    version: u32,
    state: &T,
) -> Result<(), Error> {
    let mut header = [0u8; HEADER_LEN];
    header[..4].copy_from_slice(MAGIC);
    header[4] = ENVELOPE_VERSION;
    header[5] = STATE_ENCODING_MSGPACK;
    header[6..].copy_from_slice(&version.to_le_bytes());
    out.write_all(&header)
        .map_err(|e| Error::from(format!("cannot write state: {e}")))?;
    let mut ser = rmp_serde::Serializer::new(out).with_struct_map();
    state
        .serialize(&mut ser)
        .map_err(|e| Error::from(format!("cannot serialize state: {e}")))
}

/// Serialize `state` into the SDK's envelope, tagged with `version`, in
/// memory.
///
/// # Errors
/// When serde fails to serialize the state.
pub fn encode_state<T: Serialize + ?Sized>(version: u32, state: &T) -> Result<Vec<u8>, Error> {
    let mut out = Vec::with_capacity(64);
    write_state(&mut out, version, state)?;
    Ok(out)
}

/// Decode state written by [`write_state`] from `from` as it is read;
/// returns the state version it was written with.
///
/// # Errors
/// When the bytes are not an envelope, use an unknown envelope version or
/// encoding, carry a state version above `max_version`, or do not
/// deserialize into `T`.
pub fn read_state<T: DeserializeOwned>(
    max_version: u32,
    from: &mut impl io::Read,
) -> Result<(u32, T), Error> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match from.read(&mut header[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("cannot read state: {e}").into()),
        }
    }
    if got < HEADER_LEN || &header[..4] != MAGIC {
        return Err("state is not a memento-guest snapshot (bad magic)".into());
    }
    if header[4] != ENVELOPE_VERSION {
        return Err(format!(
            "state envelope version {} is not supported (expected {ENVELOPE_VERSION})",
            header[4]
        )
        .into());
    }
    if header[5] != STATE_ENCODING_MSGPACK {
        return Err(format!("state encoding {} is not supported", header[5]).into());
    }
    let version = u32::from_le_bytes(header[6..10].try_into().expect("4 bytes"));
    if version > max_version {
        return Err(format!(
            "state was written with state version {version}, this operator reads up to {max_version}"
        )
        .into());
    }
    let state = rmp_serde::from_read(from)
        .map_err(|e| Error::from(format!("cannot decode state (version {version}): {e}")))?;
    Ok((version, state))
}

/// Decode state written by [`encode_state`] from memory; returns the state
/// version it was written with.
///
/// # Errors
/// As [`read_state`].
pub fn decode_state<T: DeserializeOwned>(max_version: u32, mut bytes: &[u8]) -> Result<(u32, T), Error> {
    read_state(max_version, &mut bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::collections::BTreeMap;

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct V1 {
        counts: BTreeMap<String, u64>,
    }

    /// v2 of the same operator: one field added, with a default.
    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct V2 {
        counts: BTreeMap<String, u64>,
        #[serde(default)]
        total: u64,
    }

    fn v1() -> V1 {
        V1 {
            counts: [("a".to_string(), 3), ("b".to_string(), 1)].into(),
        }
    }

    #[test]
    fn round_trip() {
        let bytes = encode_state(1, &v1()).unwrap();
        let (version, back): (u32, V1) = decode_state(1, &bytes).unwrap();
        assert_eq!(version, 1);
        assert_eq!(back, v1());
    }

    #[test]
    fn v2_with_added_default_field_restores_v1_snapshot() {
        let bytes = encode_state(1, &v1()).unwrap();
        let (version, v2): (u32, V2) = decode_state(2, &bytes).unwrap();
        assert_eq!(version, 1);
        assert_eq!(v2.counts, v1().counts);
        assert_eq!(v2.total, 0);
    }

    #[test]
    fn newer_state_version_is_refused() {
        let bytes = encode_state(3, &v1()).unwrap();
        let err = decode_state::<V1>(2, &bytes).unwrap_err();
        assert!(err.message().contains("state version 3"), "{err:?}");
    }

    #[test]
    fn garbage_is_refused() {
        let err = decode_state::<V1>(1, b"hello world").unwrap_err();
        assert!(err.message().contains("bad magic"), "{err:?}");
        let mut bytes = encode_state(1, &v1()).unwrap();
        bytes.truncate(bytes.len() - 3);
        let err = decode_state::<V1>(1, &bytes).unwrap_err();
        assert!(err.message().contains("cannot decode state"), "{err:?}");
    }
}
