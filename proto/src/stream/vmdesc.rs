//! The vmdesc trailer: QEMU's JSON description of the device sections it sent.
//!
//! Device sections are vmstate with no length field, so their size is known
//! only to code that understands every device. QEMU appends, after EOF, a JSON
//! record of every field it wrote and how many bytes each took; from that the
//! body length of each section follows without knowing any device.

use std::collections::HashMap;

use serde_json::Value;

use super::marker;

/// Errors of reading a vmdesc trailer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The trailer is not JSON.
    #[error("vmdesc trailer is not valid JSON")]
    Json(#[from] serde_json::Error),
}

/// The range of the vmdesc JSON in `tail`, the last bytes of a stream: the
/// EOF marker, the vmdesc marker, a be32 length and exactly that much JSON
/// up to the end. The last such position wins: QEMU's JSON is text, so no
/// later match can start inside it, while an earlier one may be guest bytes.
pub fn trailer_range(tail: &[u8]) -> Option<std::ops::Range<usize>> {
    (1..tail.len().saturating_sub(5)).rev().find_map(|p| {
        let len = u32::from_be_bytes(tail[p + 1..p + 5].try_into().ok()?) as usize;
        let json = p + 5;
        (tail[p] == marker::VMDESCRIPTION
            && tail.len() - json == len
            && tail.get(json) == Some(&b'{')
            && tail[p - 1] == marker::EOF)
            .then_some(json..tail.len())
    })
}

/// The `page_size` a vmdesc declares, if it is JSON and has one.
pub fn page_size(json: &[u8]) -> Option<u64> {
    serde_json::from_slice::<Value>(json).ok()?["page_size"].as_u64()
}

/// Body lengths of device sections by (idstr, instance id), for every device
/// the description covers completely. Devices saved the old way (no fields
/// described) are left out, so the parser finds their footer instead.
pub fn section_sizes(json: &[u8]) -> Result<HashMap<(String, u32), u64>, Error> {
    let v: Value = serde_json::from_slice(json)?;
    let mut sizes = HashMap::new();
    for dev in v["devices"].as_array().into_iter().flatten() {
        let (Some(name), Some(instance)) = (dev["name"].as_str(), dev["instance_id"].as_u64())
        else {
            continue;
        };
        if dev.get("fields").is_none() && dev.get("subsections").is_none() {
            continue;
        }
        if let Some(size) = vmsd_size(dev) {
            sizes.insert((name.to_owned(), instance as u32), size);
        }
    }
    Ok(sizes)
}

/// Bytes a described vmstate took: its fields, then its subsections, each of
/// which is framed by a marker, its counted name and a be32 version.
fn vmsd_size(v: &Value) -> Option<u64> {
    let mut total = 0u64;
    for f in v["fields"].as_array().into_iter().flatten() {
        let size = f.get("size")?.as_u64()?;
        // An array of plain values is described once, for its first element.
        let n = f.get("array_len").and_then(Value::as_u64).unwrap_or(1);
        total = total.checked_add(size.checked_mul(n)?)?;
    }
    for s in v["subsections"].as_array().into_iter().flatten() {
        let name = s.get("vmsd_name")?.as_str()?;
        total = total.checked_add(1 + 1 + name.len() as u64 + 4 + vmsd_size(s)?)?;
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_add_fields_arrays_and_subsections() {
        let json = br#"{"page_size":4096,"devices":[
            {"name":"timer","instance_id":0,"vmsd_name":"timer","version":2,
             "fields":[{"name":"a","type":"int64","size":8},
                       {"name":"b","type":"uint8","size":1,"array_len":3}],
             "subsections":[{"vmsd_name":"timer/x","version":1,
                             "fields":[{"name":"c","type":"uint32","size":4}]}]},
            {"name":"old","instance_id":1}]}"#;
        let sizes = section_sizes(json).unwrap();
        assert_eq!(sizes[&("timer".to_owned(), 0)], 8 + 3 + (1 + 1 + 7 + 4 + 4));
        assert!(!sizes.contains_key(&("old".to_owned(), 1)));
    }

    #[test]
    fn trailer_is_found_only_at_the_very_end() {
        let json = br#"{"devices":[]}"#;
        let mut s = vec![1, 2, 3, marker::EOF, marker::VMDESCRIPTION];
        s.extend_from_slice(&(json.len() as u32).to_be_bytes());
        s.extend_from_slice(json);
        assert_eq!(trailer_range(&s).map(|r| &s[r]), Some(&json[..]));
        s.push(0);
        assert_eq!(trailer_range(&s), None);
    }
}
