//! Structural checks of a parsed graph: unique ids, edges between known stages whose payloads the
//! producer makes and the consumer takes, no cycles, outputs that exist and fit their modality,
//! and no dead stages.

use super::fields::bad;
use super::{
    join, modality_payload, router_experts, ConnectorKind, DeployError, DeployGraph, EdgeSpec,
    Site, StageKind,
};
use std::collections::HashMap;

/// Runs every structural check; returns the first problem found.
pub(super) fn check(g: &DeployGraph, file: &str) -> Result<(), DeployError> {
    let file_s = || file.to_string();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for (i, s) in g.stages.iter().enumerate() {
        if let Some(&first) = index.get(s.id.as_str()) {
            return Err(DeployError::DuplicateStage {
                file: file_s(),
                stage: s.id.clone(),
                first: first + 1,
                second: i + 1,
            });
        }
        index.insert(&s.id, i);
    }
    if let Some(s) = g.stages.iter().find(|s| s.remote) {
        if g.cluster.is_none() {
            return Err(bad(
                file,
                &Site::Stage(s.id.clone()),
                "remote",
                "remote stages are found through etcd: add a [cluster] table with `etcd = [...]`",
            ));
        }
    }

    for (i, e) in g.edges.iter().enumerate() {
        let site = edge_site(i, e);
        let unknown = |field: &str, stage: &str| DeployError::UnknownEdgeStage {
            file: file_s(),
            site: Box::new(site.clone()),
            field: field.into(),
            stage: stage.into(),
        };
        let from = &g.stages[*index
            .get(e.from.as_str())
            .ok_or_else(|| unknown("from", &e.from))?];
        let to = &g.stages[*index
            .get(e.to.as_str())
            .ok_or_else(|| unknown("to", &e.to))?];
        if !from.outputs.contains(&e.carries) {
            return Err(DeployError::EdgeNotProduced {
                file: file_s(),
                site: Box::new(site.clone()),
                stage: from.id.clone(),
                payload: e.carries,
                has: join(&from.outputs),
            });
        }
        if !to.kind.accepts().contains(&e.carries) {
            return Err(DeployError::EdgeNotAccepted {
                file: file_s(),
                site: Box::new(site),
                stage: to.id.clone(),
                kind: to.kind,
                payload: e.carries,
                allowed: join(to.kind.accepts()),
            });
        }
        if e.connector == ConnectorKind::Tcp && !(from.remote || to.remote) {
            return Err(bad(
                file,
                &site,
                "connector",
                &format!(
                    "a `tcp` edge crosses hosts: mark `{}` or `{}` remote = true (its workers are \
                     reached over TCP), or use connector = \"inproc\"",
                    e.from, e.to
                ),
            ));
        }
    }

    // Every edge end is known from here on.
    let ends: Vec<(usize, usize)> = g
        .edges
        .iter()
        .map(|e| (index[e.from.as_str()], index[e.to.as_str()]))
        .collect();
    if let Some((edge, cycle)) = find_cycle(g.stages.len(), &ends) {
        let mut names: Vec<String> = cycle.iter().map(|&i| g.stages[i].id.clone()).collect();
        if let Some(first) = names.first().cloned() {
            names.push(first);
        }
        return Err(DeployError::Cycle {
            file: file_s(),
            site: Box::new(edge_site(edge, &g.edges[edge])),
            cycle: names,
        });
    }

    if g.outputs.is_empty() {
        return Err(DeployError::NoOutputs { file: file_s() });
    }
    for (m, id) in &g.outputs {
        let Some(&i) = index.get(id.as_str()) else {
            return Err(DeployError::OutputUnknownStage {
                file: file_s(),
                modality: *m,
                stage: id.clone(),
            });
        };
        let s = &g.stages[i];
        let needs = modality_payload(*m);
        // A router's output is its primary expert's: checked with the routers below.
        if s.kind != StageKind::Router && !s.outputs.contains(&needs) {
            return Err(DeployError::OutputNotProduced {
                file: file_s(),
                modality: *m,
                stage: id.clone(),
                needs,
                has: join(&s.outputs),
            });
        }
    }

    super::router::check(g, file)?;
    // Walk edges backwards from the output stages (a router stands for its experts too);
    // whatever is not reached is dead.
    let mut live = vec![false; g.stages.len()];
    let mut stack: Vec<usize> = g.outputs.iter().map(|(_, id)| index[id.as_str()]).collect();
    let experts: Vec<usize> = stack
        .iter()
        .flat_map(|&i| router_experts(&g.stages[i]))
        .filter_map(|e| index.get(e.as_str()).copied())
        .collect();
    stack.extend(experts);
    while let Some(i) = stack.pop() {
        if std::mem::replace(&mut live[i], true) {
            continue;
        }
        stack.extend(
            ends.iter()
                .filter(|(_, to)| *to == i)
                .map(|(from, _)| *from),
        );
    }
    if let Some(i) = live.iter().position(|l| !l) {
        return Err(DeployError::DeadStage {
            file: file_s(),
            stage: g.stages[i].id.clone(),
        });
    }
    Ok(())
}

/// How errors name edge `i` (0-based).
fn edge_site(i: usize, e: &EdgeSpec) -> Site {
    Site::Edge {
        index: i + 1,
        from: e.from.clone(),
        to: e.to.clone(),
    }
}

/// Finds a cycle among `n` nodes joined by `ends` (from, to). Returns the edge that closes it and
/// the nodes on it in edge order, starting at the lowest index (the edge runs from the last node
/// back to the first).
fn find_cycle(n: usize, ends: &[(usize, usize)]) -> Option<(usize, Vec<usize>)> {
    // Kahn's algorithm: peel off nodes without inbound edges; what remains contains a cycle.
    let mut indeg = vec![0usize; n];
    for &(_, to) in ends {
        indeg[to] += 1;
    }
    let mut ready: Vec<usize> = (0..n).filter(|&i| indeg[i] == 0).collect();
    let mut removed = vec![false; n];
    while let Some(u) = ready.pop() {
        removed[u] = true;
        for &(from, to) in ends {
            if from == u {
                indeg[to] -= 1;
                if indeg[to] == 0 {
                    ready.push(to);
                }
            }
        }
    }
    // Every remaining node has a remaining predecessor: walk predecessors until one repeats.
    let mut cur = removed.iter().position(|r| !r)?;
    let mut seen_at = vec![usize::MAX; n];
    let mut path = Vec::new();
    while seen_at[cur] == usize::MAX {
        seen_at[cur] = path.len();
        path.push(cur);
        cur = ends
            .iter()
            .find(|&&(from, to)| to == cur && !removed[from])?
            .0;
    }
    let mut cycle: Vec<usize> = path[seen_at[cur]..].iter().rev().copied().collect();
    let start = cycle
        .iter()
        .enumerate()
        .min_by_key(|(_, &v)| v)
        .map(|(p, _)| p)?;
    cycle.rotate_left(start);
    let (first, last) = (*cycle.first()?, *cycle.last()?);
    let edge = ends
        .iter()
        .position(|&(from, to)| from == last && to == first)?;
    Some((edge, cycle))
}

#[cfg(test)]
mod tests {
    use super::find_cycle;

    #[test]
    fn cycles_are_found_in_edge_order() {
        assert_eq!(find_cycle(3, &[(0, 1), (1, 2)]), None);
        assert_eq!(find_cycle(1, &[(0, 0)]), Some((0, vec![0])));
        // 0 -> 1 -> 2 -> 1 ; cycle is 1 -> 2 -> 1, closed by edge #2 (2 -> 1).
        assert_eq!(
            find_cycle(3, &[(0, 1), (1, 2), (2, 1)]),
            Some((2, vec![1, 2]))
        );
        assert_eq!(
            find_cycle(4, &[(3, 2), (2, 1), (1, 3), (0, 1)]),
            Some((1, vec![1, 3, 2]))
        );
    }
}
