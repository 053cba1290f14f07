//! Migration parameters that can change while a migration runs, with
//! QEMU's names, ranges and error messages (migration/options.c,
//! `migrate_params_check`).

use qapi::qmp::MigrationParameters;
use serde_json::{Map, Value};

/// QEMU's upper bound on downtime-limit, milliseconds (MAX_MIGRATE_DOWNTIME).
pub const MAX_DOWNTIME_MS: u64 = 2_000_000;

/// The parameters ferry follows while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parameters {
    /// Bandwidth cap, bytes per second; 0 = unlimited (ferry's convention;
    /// QEMU's own default is 128 MiB/s).
    pub max_bandwidth: u64,
    /// Longest acceptable pause, milliseconds.
    pub downtime_limit: u64,
    /// zlib level of `--compress` (QEMU 7.2's compress-level).
    pub compress_level: u8,
    /// multifd zlib level.
    pub multifd_zlib_level: u8,
    /// multifd zstd level.
    pub multifd_zstd_level: u8,
    /// Auto-converge throttles when the guest dirtied more than this
    /// percentage of what was sent, two rounds in a row.
    pub throttle_trigger_threshold: u8,
    /// First throttle, percent.
    pub cpu_throttle_initial: u8,
    /// Throttle added each time, percent.
    pub cpu_throttle_increment: u8,
}

impl Default for Parameters {
    /// QEMU's defaults, but for max-bandwidth (unlimited) and the multifd
    /// levels (ferry's `--multifd-*-level` default of 1).
    fn default() -> Self {
        Self {
            max_bandwidth: 0,
            downtime_limit: 300,
            compress_level: 1,
            multifd_zlib_level: 1,
            multifd_zstd_level: 1,
            throttle_trigger_threshold: 50,
            cpu_throttle_initial: 20,
            cpu_throttle_increment: 10,
        }
    }
}

/// A migrate-set-parameters request that QEMU would refuse too.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A member the command does not have.
    #[error("Parameter '{0}' is unexpected")]
    Unexpected(String),
    /// A member of the wrong JSON type.
    #[error("Invalid parameter type for '{0}', expected: integer")]
    Type(String),
    /// A value out of its range.
    #[error("Parameter '{name}' expects {what}")]
    Range {
        /// The member.
        name: &'static str,
        /// The accepted range, in QEMU's words.
        what: &'static str,
    },
    /// A parameter QEMU has that ferry cannot change while it runs.
    #[error("Parameter '{name}' cannot change during a migration in ferry: {why}")]
    Fixed {
        /// The member.
        name: &'static str,
        /// Why.
        why: &'static str,
    },
}

/// Each settable member: its name, its inclusive range, and QEMU's words for it.
const MEMBERS: [(&str, u64, u64, &str); 8] = [
    ("max-bandwidth", 0, i64::MAX as u64, "a size value"),
    (
        "downtime-limit",
        0,
        MAX_DOWNTIME_MS,
        "an integer in the range of 0 to 2000000 milliseconds",
    ),
    ("compress-level", 0, 9, "a value between 0 and 9"),
    ("multifd-zlib-level", 0, 9, "a value between 0 and 9"),
    ("multifd-zstd-level", 0, 20, "a value between 0 and 20"),
    (
        "throttle-trigger-threshold",
        1,
        100,
        "an integer in the range of 1 to 100",
    ),
    (
        "cpu-throttle-initial",
        1,
        99,
        "an integer in the range of 1 to 99",
    ),
    (
        "cpu-throttle-increment",
        1,
        99,
        "an integer in the range of 1 to 99",
    ),
];

impl Parameters {
    /// Applies migrate-set-parameters' arguments: every member is checked
    /// before any is applied, so a refused request changes nothing.
    /// `running` (the compressors exist): multifd-zlib-level may change
    /// only within zlib's family of levels (see
    /// [`super::levels::zlib_family`]); every other level changes freely.
    pub fn apply(&mut self, args: &Map<String, Value>, running: bool) -> Result<(), Error> {
        let mut next = *self;
        for (name, value) in args {
            let Some(&(name, min, max, what)) = MEMBERS.iter().find(|m| m.0 == name) else {
                return Err(Error::Unexpected(name.clone()));
            };
            let n = value.as_u64().ok_or_else(|| Error::Type(name.to_owned()))?;
            if !(min..=max).contains(&n) {
                return Err(Error::Range { name, what });
            }
            let narrow = n.min(u64::from(u8::MAX)) as u8;
            let level = match name {
                "max-bandwidth" => {
                    next.max_bandwidth = n;
                    None
                }
                "downtime-limit" => {
                    next.downtime_limit = n;
                    None
                }
                "compress-level" => Some((&mut next.compress_level, self.compress_level)),
                "multifd-zlib-level" => {
                    Some((&mut next.multifd_zlib_level, self.multifd_zlib_level))
                }
                "multifd-zstd-level" => {
                    Some((&mut next.multifd_zstd_level, self.multifd_zstd_level))
                }
                "throttle-trigger-threshold" => {
                    next.throttle_trigger_threshold = narrow;
                    None
                }
                "cpu-throttle-initial" => {
                    next.cpu_throttle_initial = narrow;
                    None
                }
                _ => {
                    next.cpu_throttle_increment = narrow;
                    None
                }
            };
            if let Some((slot, now)) = level {
                let family = super::levels::zlib_family;
                if running && name == "multifd-zlib-level" && family(narrow) != family(now) {
                    return Err(Error::Fixed {
                        name,
                        why: "a running zlib stream changes level only within 3-6 or 7-9",
                    });
                }
                *slot = narrow;
            }
        }
        *self = next;
        Ok(())
    }

    /// query-migrate-parameters' answer (QEMU's MigrationParameters; the
    /// compress level, which QEMU 9.1 dropped from its schema, is added by
    /// [`Parameters::to_json`]).
    pub fn to_qapi(&self) -> MigrationParameters {
        MigrationParameters {
            max_bandwidth: Some(self.max_bandwidth),
            downtime_limit: Some(self.downtime_limit),
            multifd_zlib_level: Some(self.multifd_zlib_level),
            multifd_zstd_level: Some(self.multifd_zstd_level),
            throttle_trigger_threshold: Some(self.throttle_trigger_threshold),
            cpu_throttle_initial: Some(self.cpu_throttle_initial),
            cpu_throttle_increment: Some(self.cpu_throttle_increment),
            ..MigrationParameters::default()
        }
    }

    /// query-migrate-parameters' answer as JSON, compress-level included.
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::to_value(self.to_qapi()).expect("parameters serialize");
        v["compress-level"] = Value::from(self.compress_level);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(v: Value) -> Map<String, Value> {
        v.as_object().expect("an object").clone()
    }

    #[test]
    fn applies_every_member_or_none() {
        let mut p = Parameters::default();
        p.apply(
            &args(json!({"max-bandwidth": 16 << 20, "downtime-limit": 50,
                         "cpu-throttle-initial": 30, "cpu-throttle-increment": 5,
                         "throttle-trigger-threshold": 80})),
            true,
        )
        .unwrap();
        assert_eq!(p.max_bandwidth, 16 << 20);
        assert_eq!(p.downtime_limit, 50);
        assert_eq!(
            (
                p.cpu_throttle_initial,
                p.cpu_throttle_increment,
                p.throttle_trigger_threshold
            ),
            (30, 5, 80)
        );
        let before = p;
        // The second member is bad: the first is not applied either.
        let e = p
            .apply(
                &args(json!({"downtime-limit": 1, "cpu-throttle-initial": 100})),
                true,
            )
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "Parameter 'cpu-throttle-initial' expects an integer in the range of 1 to 99"
        );
        assert_eq!(p, before);
    }

    #[test]
    fn refuses_what_qemu_refuses() {
        let mut p = Parameters::default();
        let e = |p: &mut Parameters, v| p.apply(&args(v), true).unwrap_err().to_string();
        assert_eq!(
            e(&mut p, json!({"max-bandwidth": "fast"})),
            "Invalid parameter type for 'max-bandwidth', expected: integer"
        );
        assert_eq!(
            e(&mut p, json!({"max-bandwidth": -1})),
            "Invalid parameter type for 'max-bandwidth', expected: integer"
        );
        assert_eq!(
            e(&mut p, json!({"no-such": 1})),
            "Parameter 'no-such' is unexpected"
        );
        assert_eq!(e(&mut p, json!({"downtime-limit": 2_000_001})), "Parameter 'downtime-limit' expects an integer in the range of 0 to 2000000 milliseconds");
        assert!(e(&mut p, json!({"multifd-zlib-level": 9}))
            .contains("cannot change during a migration"));
        // Within zlib's family, and any zstd or legacy level, goes; before
        // the compressors exist any zlib level goes.
        p.apply(&args(json!({"multifd-zlib-level": 4})), false)
            .unwrap();
        p.apply(
            &args(json!({"compress-level": 9, "multifd-zlib-level": 6})),
            true,
        )
        .unwrap();
        assert!(e(&mut p, json!({"multifd-zlib-level": 7})).contains("within 3-6"));
        p.apply(&args(json!({"multifd-zstd-level": 9})), true)
            .unwrap();
        p.apply(&args(json!({"compress-level": 1})), true).unwrap();
        p.apply(&args(json!({"multifd-zlib-level": 9})), false)
            .unwrap();
        assert_eq!(p.multifd_zstd_level, 9);
        assert_eq!(p.multifd_zlib_level, 9);
        assert_eq!(p.to_json()["multifd-zstd-level"], 9);
        assert_eq!(p.to_json()["compress-level"], 1);
    }
}
