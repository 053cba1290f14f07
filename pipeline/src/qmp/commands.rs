//! The QMP commands ferry answers, with QEMU's names, arguments, answers and
//! error classes (qapi/migration.json, qapi/control.json).

use qapi::ErrorClass;
use serde_json::{json, Map, Value};

use super::Control;

/// The commands, as query-commands lists them.
pub const COMMANDS: [&str; 8] = [
    "qmp_capabilities",
    "query-commands",
    "query-version",
    "query-status",
    "query-migrate",
    "query-migrate-parameters",
    "migrate-set-parameters",
    "migrate_cancel",
];

/// A command's failure: its QMP error class and description.
#[derive(Debug, Clone)]
pub struct Failure {
    /// QEMU's error class.
    pub class: ErrorClass,
    /// The description QEMU would give.
    pub desc: String,
}

impl Failure {
    /// A GenericError.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }
}

/// Runs `name` with `args` (negotiation is the server's business).
pub fn execute(control: &Control, name: &str, args: &Map<String, Value>) -> Result<Value, Failure> {
    let no_args = || match args.keys().next() {
        Some(k) => Err(Failure::generic(format!("Parameter '{k}' is unexpected"))),
        None => Ok(()),
    };
    match name {
        "query-migrate" => {
            no_args()?;
            Ok(control.figures().to_json())
        }
        "query-migrate-parameters" => {
            no_args()?;
            Ok(control.params().to_json())
        }
        "migrate-set-parameters" => {
            control
                .set_params(|p| p.apply(args, true))
                .map_err(|e| Failure::generic(e.to_string()))?;
            Ok(json!({}))
        }
        "migrate_cancel" => {
            no_args()?;
            control.request_cancel("migrate_cancel");
            Ok(json!({}))
        }
        "query-status" => {
            no_args()?;
            let info = control.run_state().ok_or_else(|| {
                Failure::generic("ferry does not know the guest's state: it has no --guest-control")
            })?;
            Ok(serde_json::to_value(info).expect("StatusInfo serializes"))
        }
        "query-version" => {
            no_args()?;
            Ok(serde_json::to_value(version()).expect("VersionInfo serializes"))
        }
        "query-commands" => {
            no_args()?;
            Ok(COMMANDS.iter().map(|c| json!({ "name": c })).collect())
        }
        _ => Err(Failure {
            class: ErrorClass::CommandNotFound,
            desc: format!("The command {name} has not been found"),
        }),
    }
}

/// What the greeting and query-version say: the QEMU version whose QAPI
/// schema ferry answers in (qapi-qmp's), and ferry's own in `package`.
pub fn version() -> qapi::qmp::VersionInfo {
    qapi::qmp::VersionInfo {
        qemu: qapi::qmp::VersionTriple {
            major: 9,
            minor: 1,
            micro: 0,
        },
        package: format!("ferry {}", env!("CARGO_PKG_VERSION")),
    }
}
