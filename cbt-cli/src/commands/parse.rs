//! Parsers for argument values and input files (labels, range files); sizes and durations are
//! `cbt_core::units`, shared with snapshift.

use std::collections::BTreeMap;
use std::path::Path;

use cbt_core::RangeSet;
use serde::Deserialize;

use crate::error::CliError;

/// Help text of the `--changed-ranges` / `--allocated-ranges` file format.
pub const RANGES_FORMAT_HELP: &str = "\
Range files (--changed-ranges, --allocated-ranges) are JSON:
  {\"volume_size\": 10737418240,
   \"ranges\": [{\"offset\": 0, \"length\": 1048576},
              {\"offset\": 4194304, \"length\": 65536}]}
Offsets and lengths are in bytes; ranges may be unsorted, overlapping or adjacent (they are
merged); every range must end at or before volume_size. volume_size is the size of the
volume the ranges describe (CSI volume_capacity_bytes); it must not exceed the size of
--device. Changed ranges are relative to the --parent snapshot, as reported by CSI
GetMetadataDelta; allocated ranges come from GetMetadataAllocated. The JSON printed by
`cbt metadata ... -o json` is accepted as is (volume size from its summary; an incomplete
listing is refused).";

/// A parsed range file.
#[derive(Debug, Clone)]
pub struct RangesFile {
    /// Size of the volume the ranges describe.
    pub volume_size: u64,
    /// The ranges, merged.
    pub ranges: RangeSet,
}

/// Also accepts the document `cbt metadata ... -o json` prints (its `summary` carries the
/// volume size and `complete` says whether the listing finished), so the two commands pipe.
#[derive(Deserialize)]
struct RawRanges {
    volume_size: Option<u64>,
    ranges: Vec<RawRange>,
    complete: Option<bool>,
    summary: Option<RawSummary>,
}

#[derive(Deserialize)]
struct RawSummary {
    volume_capacity_bytes: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRange {
    offset: u64,
    length: u64,
}

/// Reads and validates a range file.
pub fn ranges_file(path: &Path) -> Result<RangesFile, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::usage(format!("cannot read ranges file {}: {e}", path.display())))?;
    let raw: RawRanges = serde_json::from_str(&text).map_err(|e| {
        CliError::usage(format!("ranges file {} is not valid: {e}", path.display()))
            .with_hint("see `cbt backup --help` for the format")
    })?;
    if raw.complete == Some(false) {
        return Err(CliError::usage(format!(
            "ranges file {} is an incomplete listing (the metadata call failed part way)",
            path.display()
        ))
        .with_hint("list the ranges again; backing up from a partial list would miss changes"));
    }
    let volume_size = raw
        .volume_size
        .or(raw.summary.and_then(|s| s.volume_capacity_bytes))
        .ok_or_else(|| {
            CliError::usage(format!("ranges file {} has no volume_size", path.display()))
                .with_hint("see `cbt backup --help` for the format")
        })?;
    let ranges = RangeSet::try_from_extents(raw.ranges.iter().map(|r| (r.offset, r.length)))
        .map_err(|e| CliError::usage(format!("ranges file {}: {e}", path.display())))?;
    if ranges.end() > volume_size {
        return Err(CliError::usage(format!(
            "ranges file {}: a range ends at byte {}, past volume_size {}",
            path.display(),
            ranges.end(),
            volume_size
        )));
    }
    Ok(RangesFile {
        volume_size,
        ranges,
    })
}

pub use cbt_core::units::{parse_duration as duration, parse_size as size};

/// Parses `key=value` labels into a map (later keys win).
pub fn labels(items: &[String]) -> Result<BTreeMap<String, String>, CliError> {
    let mut out = BTreeMap::new();
    for item in items {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| CliError::usage(format!("label `{item}` is not key=value")))?;
        if k.is_empty() {
            return Err(CliError::usage(format!("label `{item}` has an empty key")));
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse() {
        let l = labels(&["a=b".into(), "c=d=e".into()]).expect("valid labels");
        assert_eq!(l["a"], "b");
        assert_eq!(l["c"], "d=e");
        assert!(labels(&["nokey".into()]).is_err());
        assert!(labels(&["=v".into()]).is_err());
    }

    #[test]
    fn range_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("r.json");
        std::fs::write(&p, r#"{"volume_size": 100, "ranges": [{"offset": 50, "length": 10}, {"offset": 0, "length": 5}]}"#)
            .expect("write");
        let r = ranges_file(&p).expect("valid file");
        assert_eq!(r.volume_size, 100);
        assert_eq!(r.ranges.total_bytes(), 15);
        std::fs::write(
            &p,
            r#"{"volume_size": 100, "ranges": [{"offset": 95, "length": 10}]}"#,
        )
        .expect("write");
        assert!(ranges_file(&p).is_err());
        std::fs::write(
            &p,
            r#"{"volume_size": 100, "ranges": [{"offset": 1, "len": 1}]}"#,
        )
        .expect("write");
        assert!(ranges_file(&p).is_err());
        std::fs::write(
            &p,
            r#"{"volume_size": 100, "ranges": [{"offset": 18446744073709551615, "length": 2}]}"#,
        )
        .expect("write");
        assert!(ranges_file(&p).is_err());
        // What `cbt metadata -o json` prints.
        std::fs::write(
            &p,
            r#"{"query":"delta","ranges":[{"offset":0,"length":4096}],"complete":true,"summary":{"volume_capacity_bytes":8192,"messages":1}}"#,
        )
        .expect("write");
        let r = ranges_file(&p).expect("metadata output is accepted");
        assert_eq!((r.volume_size, r.ranges.total_bytes()), (8192, 4096));
        std::fs::write(
            &p,
            r#"{"query":"delta","ranges":[{"offset":0,"length":4096}],"complete":false}"#,
        )
        .expect("write");
        assert!(ranges_file(&p).is_err(), "an incomplete listing is refused");
        std::fs::write(&p, r#"{"ranges":[]}"#).expect("write");
        assert!(ranges_file(&p).is_err(), "volume size is required");
    }
}
