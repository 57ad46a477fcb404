//! The mapping tables: the committed `MAPPING.md` is what the code renders, and
//! every row meets RamenDR's rules (contracts §8.4, last paragraph).

use std::path::Path;

use cbt_k8s::replication::mapping::{self, StatusRow};
use cbt_k8s::replication::translate::Subject;
use cbt_k8s::replication::translate::conditions::{self, ReportKind, StateReport, reasons};
use cbt_k8s::replication::types::{
    ReplicatedState, ReplicationState, VolumeReplication, VolumeReplicationSpec,
};
use k8s_openapi::api::core::v1::TypedLocalObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

#[test]
fn mapping_doc_is_current() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/replication/MAPPING.md");
    let rendered = mapping::render_markdown();
    if std::env::var_os("UPDATE_MAPPING").is_some() {
        std::fs::write(&path, &rendered).expect("write MAPPING.md");
    }
    let committed = std::fs::read_to_string(&path).expect("read MAPPING.md");
    assert!(
        committed == rendered,
        "src/replication/MAPPING.md differs from the code's mapping; run \
         UPDATE_MAPPING=1 cargo test -p cbt-k8s --test replication_mapping and commit it"
    );
}

fn subject(desired: ReplicationState, generation: i64) -> Subject {
    let mut vr = VolumeReplication::new(
        "vr",
        VolumeReplicationSpec {
            volume_replication_class: "c".into(),
            replication_state: desired,
            data_source: TypedLocalObjectReference {
                api_group: None,
                kind: "PersistentVolumeClaim".into(),
                name: "p".into(),
            },
            auto_resync: false,
            replication_handle: String::new(),
        },
    );
    vr.metadata.namespace = Some("ns".into());
    vr.metadata.generation = Some(generation);
    Subject::from_volume(&vr).expect("subject")
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_second(1_767_225_600).expect("time"))
}

#[test]
fn every_row_meets_ramen_rules() {
    let rows = mapping::all_rows();
    assert!(rows.len() > 100, "tables cover {} rows", rows.len());
    for StatusRow {
        desired,
        observed,
        report,
        ..
    } in rows
    {
        let s = subject(desired, 7);
        let st = conditions::merge_status(&s, &report, &now(), false);
        let accepted = match desired {
            ReplicationState::Primary => conditions::ramen_accepts_primary(&st, 7),
            _ => conditions::ramen_accepts_secondary(&st, 7),
        };
        assert_eq!(
            accepted,
            mapping::role_reached(desired, report.kind),
            "{desired} / {observed}: {:?} {st:?}",
            report.kind
        );
        assert_eq!(st.observed_generation, 7);
        for c in &st.conditions {
            assert_eq!(c.observed_generation, Some(7), "{desired} / {observed}");
            assert!(
                reasons::CSI_ADDONS.contains(&c.reason.as_str())
                    || reasons::OWN.contains(&c.reason.as_str()),
                "{desired} / {observed}: reason {}",
                c.reason
            );
        }
        // Not reached: Completed is False, so neither Ramen nor a person mistakes it for done.
        if !matches!(
            report.kind,
            ReportKind::Converged | ReportKind::ConvergedDegraded | ReportKind::Resyncing
        ) {
            let completed = st.conditions.iter().find(|c| c.type_ == "Completed");
            assert_eq!(
                completed.map(|c| c.status.as_str()),
                Some("False"),
                "{desired} / {observed}"
            );
        }
        // A reached secondary always says Secondary, a reached primary Primary.
        if mapping::role_reached(desired, report.kind) {
            let want = match desired {
                ReplicationState::Primary => ReplicatedState::Primary,
                _ => ReplicatedState::Secondary,
            };
            assert_eq!(
                report.state,
                StateReport::Known(want),
                "{desired} / {observed}"
            );
        }
    }
}

#[test]
fn tables_say_what_the_issue_asks() {
    let doc = mapping::render_markdown();
    let line = |needle: &[&str]| {
        doc.lines()
            .find(|l| needle.iter().all(|n| l.contains(n)))
            .unwrap_or_else(|| panic!("no row with {needle:?}"))
            .to_string()
    };
    // Trident: primary -> promoted; secondary new -> established; after primary -> reestablished.
    assert!(line(&["| primary | any | no TMR |"]).contains("create TMR, `spec.state` `promoted`"));
    assert!(line(&["| secondary | any | no TMR |"]).contains("`established`"));
    assert!(line(&["| secondary | any | spec `promoted`"]).contains("`reestablished`"));
    assert!(
        line(&["| resync |", "spec `established`, status `established`"])
            .contains("TridentActionMirrorUpdate")
    );
    // Trident status: promoted -> Primary/Completed Promoted; establishing -> Resyncing + Degraded.
    assert!(
        line(&["| primary | spec `promoted`, status `promoted` |"])
            .contains("| Primary | True Promoted | False Healthy |")
    );
    assert!(
        line(&["| secondary | spec `established`, status `establishing` |"])
            .contains("| Secondary | True Demoted | True VolumeDegraded | True ResyncTriggered |")
    );
    assert!(
        line(&["| primary | spec `promoted`, status `failed` |"])
            .contains("| Unknown | False FailedToPromote | True Error |")
    );
    assert!(
        line(&["| secondary | spec `established`, status `invalid` |"])
            .contains("False PrerequisiteNotMet")
    );
    // Dell verbs.
    assert!(
        line(&["| primary | not source, link `SYNCHRONIZED`"]).contains("UNPLANNED_FAILOVER_LOCAL")
    );
    assert!(line(&["| primary | source, link `FAILEDOVER`"]).contains("REPROTECT_LOCAL"));
    assert!(line(&["| secondary | source, link `SYNCHRONIZED`"]).contains("FAILOVER_REMOTE"));
    assert!(line(&["| resync | not source, link `SYNCHRONIZED`"]).contains("`spec.action: SYNC`"));
    assert!(line(&["| resync | source, link `SYNCHRONIZED`"]).contains("ConflictingState"));
    assert!(
        line(&["| secondary | not source, link `SUSPENDED`, autoResync true"]).contains("RESUME")
    );
    assert!(
        line(&["| secondary | not source, link `SUSPENDED`, autoResync false"])
            .contains("| none |")
    );
    assert!(line(&["suspended by a person", "| primary | source"]).contains("| none |"));
    assert!(
        !doc.contains("spec.action: SUSPEND`"),
        "we never send SUSPEND"
    );
    assert!(line(&["`spec.action` set by someone else"]).contains("ChangedByHand"));
}
