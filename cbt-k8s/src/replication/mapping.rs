//! Mapping tables rendered from the translation code.
//!
//! Owns: enumerating the inputs of the per-backend decision functions
//! ([`trident::step`], [`trident::member_report`], [`trident::aggregate`],
//! [`dell::need`], [`dell::decide`]) and rendering what they return as
//! Markdown. The rendered text is committed as `MAPPING.md` beside this file
//! and a test fails when the two differ, so the documentation cannot drift
//! from the code (`UPDATE_MAPPING=1 cargo test -p cbt-k8s --test
//! replication_mapping` rewrites it). The rows are also returned as data so
//! tests can check them against RamenDR's rules.
//!
//! The committed tables follow.
#![doc = ""]
#![doc = include_str!("MAPPING.md")]

use std::fmt::Write as _;

use super::translate::conditions::{
    CondSpec, MANAGED_TYPES, Report, ReportKind, StateReport, reasons,
};
use super::translate::dell::{self, Decision, DellAction, LinkState, Need, RgState, RgView};
use super::translate::trident::{self, MemberKind, MemberReport, Step, TamuView, TmrView};
use super::translate::{Backend, ceph};
use super::types::{MirrorState, MirrorStatusState, ReplicationState};

/// One row of an observation -> status table.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusRow {
    /// Desired csi-addons state.
    pub desired: ReplicationState,
    /// The observation, in words.
    pub observed: String,
    /// What we write to the backend, in words (`none` when nothing).
    pub write: String,
    /// The resulting report.
    pub report: Report,
}

/// One row of a desired -> write table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteRow {
    /// Desired csi-addons state.
    pub desired: ReplicationState,
    /// `autoResync` (`any` when it makes no difference).
    pub auto_resync: String,
    /// The observation, in words.
    pub observed: String,
    /// What we write, in words.
    pub write: String,
}

const DESIRED: [ReplicationState; 3] = ReplicationState::ALL;

fn mirror_state(s: MirrorState) -> String {
    match s {
        MirrorState::Unset => "`\"\"`".into(),
        s => format!("`{}`", s.as_str()),
    }
}

fn step_text(spec: Option<MirrorState>, step: Step) -> String {
    match (spec, step) {
        (_, Step::Keep) => "none".into(),
        (None, Step::Set(s)) => format!("create TMR, `spec.state` {}", mirror_state(s)),
        (Some(_), Step::Set(s)) => format!("patch `spec.state` -> {}", mirror_state(s)),
        (_, Step::MirrorUpdate) => {
            "create TridentActionMirrorUpdate `<pvc>-resync-g<generation>` (once)".into()
        }
    }
}

/// Trident desired -> TMR write, per member PVC (update not yet made).
pub fn trident_write_rows() -> Vec<WriteRow> {
    let specs: [Option<MirrorState>; 5] = [
        None,
        Some(MirrorState::Unset),
        Some(MirrorState::Promoted),
        Some(MirrorState::Established),
        Some(MirrorState::Reestablished),
    ];
    let mut rows = Vec::new();
    for desired in DESIRED {
        for spec in specs {
            let healthy = match spec {
                Some(MirrorState::Promoted) => MirrorStatusState::Promoted,
                Some(MirrorState::Reestablished) => MirrorStatusState::Reestablished,
                _ => MirrorStatusState::Established,
            };
            let outcome = |auto: bool, status: &MirrorStatusState| {
                let view = TmrView {
                    spec,
                    status: status.clone(),
                    stale: false,
                };
                step_text(spec, trident::step(desired, auto, &view, false))
            };
            let spec_text = match spec {
                None => "no TMR".to_string(),
                Some(s) => format!("spec {}", mirror_state(s)),
            };
            let statuses: Vec<(String, MirrorStatusState)> = if spec.is_none() {
                vec![(String::new(), MirrorStatusState::Empty)]
            } else {
                vec![
                    (
                        format!(", status {}", mirror_status(&healthy)),
                        healthy.clone(),
                    ),
                    (", status `failed`".into(), MirrorStatusState::Failed),
                ]
            };
            let all: Vec<String> = [false, true]
                .iter()
                .flat_map(|a| statuses.iter().map(move |(_, st)| (*a, st)))
                .map(|(a, st)| outcome(a, st))
                .collect();
            if all.iter().all(|o| *o == all[0]) {
                rows.push(WriteRow {
                    desired,
                    auto_resync: "any".into(),
                    observed: format!(
                        "{spec_text}{}",
                        if spec.is_some() { ", any status" } else { "" }
                    ),
                    write: all[0].clone(),
                });
                continue;
            }
            for (label, st) in &statuses {
                let (f, t) = (outcome(false, st), outcome(true, st));
                if f == t {
                    rows.push(WriteRow {
                        desired,
                        auto_resync: "any".into(),
                        observed: format!("{spec_text}{label}"),
                        write: f,
                    });
                } else {
                    for (auto, write) in [(false, f), (true, t)] {
                        rows.push(WriteRow {
                            desired,
                            auto_resync: auto.to_string(),
                            observed: format!("{spec_text}{label}"),
                            write,
                        });
                    }
                }
            }
        }
    }
    rows
}

fn mirror_status(s: &MirrorStatusState) -> String {
    match s {
        MirrorStatusState::Other(t) => format!("other text (e.g. `{t}`)"),
        MirrorStatusState::Empty => "`\"\"`".into(),
        s => format!("`{}`", s.as_str()),
    }
}

/// Trident observation -> status, for a member whose spec is what the desired state asks.
pub fn trident_status_rows() -> Vec<StatusRow> {
    let mut statuses = MirrorStatusState::NAMED.to_vec();
    statuses.push(MirrorStatusState::Other("broken".into()));
    let mut rows = Vec::new();
    for desired in DESIRED {
        let spec = match desired {
            ReplicationState::Primary => MirrorState::Promoted,
            _ => MirrorState::Established,
        };
        // A resync of an established TMR is done once its mirror update succeeded.
        let update = match desired {
            ReplicationState::Resync => TamuView::Succeeded(None),
            _ => TamuView::Absent,
        };
        let update_text = match desired {
            ReplicationState::Resync => ", mirror update `Succeeded`",
            _ => "",
        };
        for status in &statuses {
            let view = TmrView {
                spec: Some(spec),
                status: status.clone(),
                stale: false,
            };
            let member = trident::member_report(desired, &view, &update, "");
            rows.push(StatusRow {
                desired,
                observed: format!(
                    "spec {}, status {}{update_text}",
                    mirror_state(spec),
                    mirror_status(status)
                ),
                write: "none".into(),
                report: trident::aggregate(desired, &[("p".into(), member)]),
            });
        }
        let stale = TmrView {
            spec: Some(spec),
            status: MirrorStatusState::Established,
            stale: true,
        };
        rows.push(StatusRow {
            desired,
            observed: "any status with `observedGeneration` older than the TMR's".into(),
            write: "none".into(),
            report: trident::aggregate(
                desired,
                &[(
                    "p".into(),
                    trident::member_report(desired, &stale, &TamuView::Absent, ""),
                )],
            ),
        });
    }
    rows
}

/// Trident groups: how member states combine (all or nothing).
pub fn trident_group_rows() -> Vec<StatusRow> {
    let m = |kind, detail: &str| MemberReport {
        kind,
        detail: detail.into(),
        last_sync: None,
    };
    let mut rows = Vec::new();
    for desired in [ReplicationState::Primary, ReplicationState::Secondary] {
        let ok = match desired {
            ReplicationState::Primary => MemberKind::PrimaryOk,
            _ => MemberKind::SecondaryOk,
        };
        let mut mixes: Vec<(&str, Vec<MemberReport>)> = vec![
            ("every member done", vec![m(ok, "ok"), m(ok, "ok")]),
            (
                "one member in progress",
                vec![m(ok, "ok"), m(MemberKind::InProgress, "promoting")],
            ),
            (
                "one member failed, one in progress",
                vec![
                    m(MemberKind::InProgress, "promoting"),
                    m(MemberKind::Failed, "Trident reports failed"),
                ],
            ),
            (
                "one member invalid, one failed",
                vec![
                    m(MemberKind::Failed, "Trident reports failed"),
                    m(MemberKind::Invalid, "Trident reports invalid"),
                ],
            ),
        ];
        if desired == ReplicationState::Secondary {
            mixes.push((
                "one member resyncing",
                vec![m(ok, "ok"), m(MemberKind::Resyncing, "establishing")],
            ));
        }
        for (label, members) in mixes {
            let named: Vec<(String, MemberReport)> = members
                .into_iter()
                .enumerate()
                .map(|(i, r)| (format!("p{i}"), r))
                .collect();
            rows.push(StatusRow {
                desired,
                observed: label.into(),
                write: "none".into(),
                report: trident::aggregate(desired, &named),
            });
        }
    }
    rows
}

fn rg_view(is_source: bool, link: LinkState, hand_suspended: bool) -> RgView {
    RgView {
        state: RgState::Ready,
        is_source,
        link,
        link_error: String::new(),
        pending: None,
        hand_suspended,
        link_fresh: true,
        last_result: None,
    }
}

fn need_outcome(desired: ReplicationState, need: Need) -> (String, Report) {
    match need {
        Need::Verb(v) => (
            format!("`spec.action: {}`", v.as_str()),
            Report::in_progress(desired, &format!("{} requested", v.as_str())),
        ),
        Need::Done(r) => ("none".into(), r),
        Need::Conflict(detail) => (
            "none (refused: ConflictingState)".into(),
            Report::rejected(
                desired,
                &super::translate::Rejection::ConflictingState { detail },
            ),
        ),
    }
}

/// Dell desired + RG source role and link state -> verb and status (no verb sent yet this transition).
pub fn dell_rows() -> Vec<StatusRow> {
    let mut links = LinkState::NAMED.to_vec();
    links.push(LinkState::Other(String::new()));
    let mut rows = Vec::new();
    for desired in DESIRED {
        for is_source in [true, false] {
            for link in &links {
                let label = |extra: &str| {
                    format!(
                        "{}, link {}{extra}",
                        if is_source { "source" } else { "not source" },
                        match link {
                            LinkState::Other(_) => "`\"\"` or other".to_string(),
                            l => format!("`{}`", l.as_str()),
                        }
                    )
                };
                let view = rg_view(is_source, link.clone(), false);
                let f = need_outcome(desired, dell::need(desired, false, &view));
                let t = need_outcome(desired, dell::need(desired, true, &view));
                if f == t {
                    rows.push(StatusRow {
                        desired,
                        observed: label(""),
                        write: f.0,
                        report: f.1,
                    });
                } else {
                    for (auto, (write, report)) in [(false, f), (true, t)] {
                        rows.push(StatusRow {
                            desired,
                            observed: label(&format!(", autoResync {auto}")),
                            write,
                            report,
                        });
                    }
                }
                if *link == LinkState::Suspended {
                    let view = rg_view(is_source, link.clone(), true);
                    let (write, report) = need_outcome(desired, dell::need(desired, true, &view));
                    rows.push(StatusRow {
                        desired,
                        observed: label(", suspended by a person (last action `SUSPEND`)"),
                        write,
                        report,
                    });
                }
            }
        }
    }
    rows
}

/// Dell RG states and pending actions: what we do before looking at the link.
pub fn dell_rg_state_rows() -> Vec<StatusRow> {
    let desired = ReplicationState::Primary;
    let base = rg_view(false, LinkState::Synchronized, false);
    let verb = DellAction::UnplannedFailoverLocal.as_str().to_string();
    let cases: Vec<(&str, RgView, Vec<String>)> = vec![
        (
            "`spec.action` set by us, not picked up",
            RgView {
                pending: Some(verb.clone()),
                ..base.clone()
            },
            vec![verb.clone()],
        ),
        (
            "`spec.action` set by someone else",
            RgView {
                pending: Some("SUSPEND".into()),
                ..base.clone()
            },
            vec![],
        ),
        (
            "`status.state` `<ACTION>_IN_PROGRESS`",
            RgView {
                state: RgState::InProgress("SYNC".into()),
                ..base.clone()
            },
            vec![],
        ),
        (
            "`status.state` `Invalid`",
            RgView {
                state: RgState::Invalid,
                ..base.clone()
            },
            vec![],
        ),
        (
            "`status.state` `Deleting`",
            RgView {
                state: RgState::Deleting,
                ..base.clone()
            },
            vec![],
        ),
        (
            "our verb sent, no result recorded yet",
            base.clone(),
            vec![verb.clone()],
        ),
        (
            "our verb failed (`status.state` `Error`)",
            RgView {
                state: RgState::Error,
                last_result: Some((verb.clone(), dell::VerbResult::Failed("boom".into()))),
                ..base.clone()
            },
            vec![verb.clone()],
        ),
        (
            "link polled before the last action finished",
            RgView {
                link_fresh: false,
                ..base.clone()
            },
            vec![],
        ),
    ];
    cases
        .into_iter()
        .map(|(label, view, sent)| {
            let (write, report) = match dell::decide(desired, false, &view, &sent, &sent, "rg") {
                Decision::Request(v) => (
                    format!("`spec.action: {}`", v.as_str()),
                    Report::in_progress(desired, v.as_str()),
                ),
                Decision::Report(r) => ("none".into(), r),
                Decision::Reject(r) => (
                    format!("none (refused: {})", rejection_name(&r)),
                    Report::rejected(desired, &r),
                ),
            };
            StatusRow {
                desired,
                observed: label.into(),
                write,
                report,
            }
        })
        .collect()
}

fn rejection_name(r: &super::translate::Rejection) -> String {
    let debug = format!("{r:?}");
    debug
        .split([' ', '{', '('])
        .next()
        .unwrap_or_default()
        .to_string()
}

fn cell(report: &Report, type_: &str) -> String {
    match report.conditions.iter().find(|c| c.type_ == type_) {
        Some(CondSpec { status, reason, .. }) => format!("{} {reason}", status.as_str()),
        None => "-".into(),
    }
}

fn state_cell(report: &Report) -> String {
    match report.state {
        StateReport::Known(s) => s.as_str().to_string(),
        StateReport::Previous => "(unchanged)".into(),
    }
}

fn status_table(out: &mut String, rows: &[StatusRow], with_write: bool) {
    let mut header = String::from("| desired | observed |");
    if with_write {
        header.push_str(" write |");
    }
    header.push_str(" status.state |");
    for t in MANAGED_TYPES {
        let _ = write!(header, " {t} |");
    }
    let _ = writeln!(out, "{header}");
    let cols = header.matches('|').count() - 1;
    let _ = writeln!(out, "|{}", "---|".repeat(cols));
    for r in rows {
        let mut line = format!("| {} | {} |", r.desired, r.observed);
        if with_write {
            let _ = write!(line, " {} |", r.write);
        }
        let _ = write!(line, " {} |", state_cell(&r.report));
        for t in MANAGED_TYPES {
            let _ = write!(line, " {} |", cell(&r.report, t));
        }
        let _ = writeln!(out, "{line}");
    }
    out.push('\n');
}

/// The whole mapping document (the content of `MAPPING.md`).
pub fn render_markdown() -> String {
    let mut out = String::new();
    out.push_str(
        "<!-- Generated by cbt_k8s::replication::mapping::render_markdown; do not edit. -->\n\
         <!-- Regenerate: UPDATE_MAPPING=1 cargo test -p cbt-k8s --test replication_mapping -->\n\n",
    );
    out.push_str("# csi-addons replication: backend mapping\n\n");
    out.push_str(
        "Each table is produced by running the translation functions over their inputs.\n\
         `-` means the condition is not set (a stale one is removed). `(unchanged)` keeps the\n\
         previous `status.state`. Reasons `PromotionInProgress`, `DemotionInProgress` and\n\
         `ResyncInProgress` are ours (csi-addons drivers answer synchronously and have none);\n\
         every other reason is a csi-addons constant. Every condition carries\n\
         `observedGeneration` = the object's generation, as is `status.observedGeneration`.\n\n",
    );

    out.push_str(
        "## Which backend serves a class\n\n| provisioner | backend | we write |\n|---|---|---|\n",
    );
    for b in Backend::ALL {
        let (prov, writes) = match b {
            Backend::Trident => (
                format!("`{}`", b.driver()),
                "TridentMirrorRelationship per PVC, TridentActionMirrorUpdate; csi-addons status",
            ),
            Backend::DellPowerStore => (
                format!("`{}`", b.driver()),
                "`spec.action` and our ledger annotation on the DellCSIReplicationGroup; csi-addons status",
            ),
            Backend::CephRbd => (
                format!("`{}` or `<prefix>.{}`", ceph::DRIVER, ceph::DRIVER),
                "nothing: ceph-csi serves csi-addons itself; invalid class parameters become Warning events",
            ),
        };
        let _ = writeln!(out, "| {prov} | {} | {writes} |", b.name());
    }
    out.push_str(
        "| anything else | - | nothing; `Validated=False PrerequisiteNotMet` (UnknownProvisioner) |\n\n\
         A VolumeGroupReplication for Trident or Dell must have `spec.external: true`, or the\n\
         csi-addons controller would drive it too; a Ceph one must not.\n\n",
    );

    out.push_str("## Trident: desired state -> TMR write (per PVC)\n\n");
    out.push_str(
        "One TridentMirrorRelationship per PVC, named after it, with exactly one volume mapping.\n\
         `(re)established` needs the remote volume handle (`spec.replicationHandle`, PVC annotation\n\
         `replication.cbt.io/remote-volume-handle`, or class parameter `remoteVolumeHandle`).\n\
         A TMR that is not ours, or was edited by hand, is refused without a write.\n\
         Deleting the VolumeReplication deletes its TMRs, **which makes Trident promote the volume**.\n\n",
    );
    out.push_str("| desired | autoResync | observed | write |\n|---|---|---|---|\n");
    for r in trident_write_rows() {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            r.desired, r.auto_resync, r.observed, r.write
        );
    }
    out.push('\n');

    out.push_str("## Trident: observation -> status (per PVC)\n\n");
    status_table(&mut out, &trident_status_rows(), false);

    out.push_str("## Trident: a group is all or nothing\n\n");
    out.push_str(
        "A VolumeGroupReplication on Trident is N TMRs moved together. Members' messages are\n\
         joined into the conditions, naming the PVC (`PVC p1: Trident reports failed`).\n\n",
    );
    status_table(&mut out, &trident_group_rows(), false);

    out.push_str("## Dell PowerStore: desired state and RG link -> verb and status\n\n");
    out.push_str(
        "The RG of the protection group (PVC label `replication.storage.dell.com/replicationGroupName`)\n\
         must hold exactly the selected PVCs. A selected PVC the sidecar has not labelled yet is\n\
         pending (named in `status.message`, not a member until labelled; the conditions below are\n\
         those of the labelled members); with no labelled member the group is refused.\n\
         A verb goes out once per transition\n\
         (`<desired>@<generation>`), recorded with it in annotation `replication.cbt.io/dell-actions`.\n\
         Rows assume no verb was sent yet in this transition; once sent, the row becomes\n\
         in progress until the link state shows the result (a `SYNC` that succeeded completes a resync).\n\n",
    );
    status_table(&mut out, &dell_rows(), true);

    out.push_str("## Dell PowerStore: RG state checked first\n\n");
    status_table(&mut out, &dell_rg_state_rows(), true);

    out.push_str("## RamenDR\n\n");
    out.push_str(
        "RamenDR (contracts §8.4) accepts a primary when `Completed` is True and `Validated` is\n\
         True or absent, and a secondary when `Completed` is True and either `Resyncing` and\n\
         `Degraded` are both True, or both False with `status.state` Secondary, always with\n\
         `observedGeneration` equal to the generation. In every table above Ramen accepts a row\n\
         exactly when the role is reached: a primary that is promoted (even if not replicating),\n\
         a secondary that is in sync or resyncing. Rejected, failed, invalid and in-progress rows\n\
         have `Completed` False. Reasons used: ",
    );
    let used: Vec<String> = reasons::CSI_ADDONS
        .iter()
        .chain(reasons::OWN.iter())
        .filter(|r| {
            all_rows()
                .iter()
                .any(|row| row.report.conditions.iter().any(|c| c.reason == **r))
        })
        .map(|r| format!("`{r}`"))
        .collect();
    out.push_str(&used.join(", "));
    out.push_str(".\n");
    out
}

/// Every status row of every table.
pub fn all_rows() -> Vec<StatusRow> {
    let mut rows = trident_status_rows();
    rows.extend(trident_group_rows());
    rows.extend(dell_rows());
    rows.extend(dell_rg_state_rows());
    rows
}

/// True when RamenDR should accept a row's report (the role is reached).
pub fn role_reached(desired: ReplicationState, kind: ReportKind) -> bool {
    match desired {
        ReplicationState::Primary => {
            matches!(kind, ReportKind::Converged | ReportKind::ConvergedDegraded)
        }
        _ => matches!(kind, ReportKind::Converged | ReportKind::Resyncing),
    }
}
