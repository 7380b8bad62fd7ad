//! A job's routed part: applying a router's decision to the job's plan (only the selected
//! experts run; an output the router serves comes from the primary), and the
//! Mixture-of-Thoughts exchange (peers' projected states fed to the primary as they come).

use super::JobRun;
use crate::orchestrator::flow::EdgeFlow;
use crate::orchestrator::JobError;
use omnistage_stages::{MotStates, Payload, RouteDecision};
use std::collections::BTreeSet;
use std::sync::Arc;

/// A Mixture-of-Thoughts job's exchange between its selected experts.
#[derive(Debug)]
pub(in crate::orchestrator) struct MotExchange {
    pub primary: usize,
    /// Peers still in their prompt pass.
    pub open_peers: BTreeSet<usize>,
    /// Label for transfer metrics and the trace (`peers=>primary`).
    label: String,
}

impl JobRun {
    /// Applies router `s`'s decision: the selected experts (and the router's edges to them)
    /// join the plan, unselected experts and their edges leave it, outputs the router serves
    /// come from the primary, and a Mixture-of-Thoughts primary with peers is told to expect
    /// their states.
    pub(super) fn on_route(
        &mut self,
        s: usize,
        decision: Arc<RouteDecision>,
    ) -> Result<(), JobError> {
        let router = self.stage_name(s);
        let fail = |message: String| JobError::StageFailed {
            stage: router.clone(),
            message,
        };
        if self.routed {
            return Err(fail("decided twice for one request".into()));
        }
        self.routed = true;
        let graph = &self.orch.graph;
        let experts = graph
            .stage(&router)
            .and_then(|spec| spec.router.as_ref())
            .map(|r| r.experts.clone())
            .unwrap_or_default();
        let mut selected = Vec::with_capacity(decision.selected.len());
        for name in &decision.selected {
            if !experts.contains(name) {
                return Err(fail(format!(
                    "selected `{name}`, which is not one of its experts"
                )));
            }
            let Some(i) = self.orch.stage_index(name) else {
                return Err(fail(format!(
                    "selected `{name}`, which has no running stage"
                )));
            };
            if selected.contains(&i) {
                return Err(fail(format!("selected `{name}` twice")));
            }
            selected.push(i);
        }
        let Some(&primary) = selected.first() else {
            return Err(fail("selected no expert".into()));
        };
        let unselected: Vec<usize> = experts
            .iter()
            .filter_map(|e| self.orch.stage_index(e))
            .filter(|i| !selected.contains(i))
            .collect();
        for m in self.plan.output_stage.values_mut() {
            if *m == s {
                *m = primary;
            }
        }
        for i in &unselected {
            self.plan.needed.remove(i);
        }
        self.plan.needed.extend(selected.iter().copied());
        let needed = &self.plan.needed;
        self.plan.edges = (0..self.orch.edges.len())
            .filter(|&e| {
                let edge = &self.orch.edges[e];
                needed.contains(&edge.from) && needed.contains(&edge.to)
            })
            .collect();
        self.flows.retain(|e, _| self.plan.edges.contains(e));
        for &e in &self.plan.edges {
            if let Some(spec) = self.orch.edges[e].stream {
                self.flows.entry(e).or_insert_with(|| EdgeFlow::new(spec));
            }
        }
        let mot = selected.iter().all(|&i| {
            graph
                .stage(self.orch.stages[i].id())
                .is_some_and(|x| x.mot.is_some())
        });
        if mot && selected.len() > 1 {
            let peers: Vec<String> = selected[1..].iter().map(|&i| self.stage_name(i)).collect();
            self.mot = Some(MotExchange {
                primary,
                open_peers: selected[1..].iter().copied().collect(),
                label: format!("{}=>{}", peers.join("+"), self.stage_name(primary)),
            });
        }
        self.trace.routed(&router, &decision);
        self.orch.observer.routed(&router, &decision);
        Ok(())
    }

    /// Whether stage `s` is a Mixture-of-Thoughts primary that takes its peers' states.
    pub(super) fn is_mot_primary(&self, s: usize) -> bool {
        self.mot.as_ref().is_some_and(|m| m.primary == s)
    }

    /// Hands a peer's states at one stack boundary to the primary.
    pub(super) fn on_mot_states(&mut self, s: usize, states: MotStates) -> Result<(), JobError> {
        let Some(mot) = &self.mot else {
            return Err(JobError::StageFailed {
                stage: self.stage_name(s),
                message: "sent Mixture-of-Thoughts states for a job without peers".into(),
            });
        };
        if !mot.open_peers.contains(&s) {
            return Ok(());
        }
        let (primary, label) = (mot.primary, mot.label.clone());
        let payload = Payload::MotStates(states);
        self.trace.transfer(&label, payload.byte_len(), 0.0);
        self.orch.observer.transfer(&label, payload.byte_len(), 0.0);
        if let Some(&replica) = self.active.get(&primary) {
            self.orch.stages[primary].feed(replica, self.request.id, vec![payload], false);
        }
        Ok(())
    }

    /// A peer finished its prompt pass; the primary hears `last` once every peer has.
    pub(super) fn mot_peer_finished(&mut self, s: usize) {
        let Some(mot) = &mut self.mot else {
            return;
        };
        if !mot.open_peers.remove(&s) || !mot.open_peers.is_empty() {
            return;
        }
        let primary = mot.primary;
        if let Some(&replica) = self.active.get(&primary) {
            self.orch.stages[primary].feed(replica, self.request.id, Vec::new(), true);
        }
    }
}
