//! Start order from dependencies: a topological sort that names what is wrong.
//!
//! Pure: takes names and dependency lists, returns indices. Services are started in the
//! returned order and stopped in its reverse.

use std::fmt;

/// A dependency graph that cannot be ordered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    #[error("two services are named `{name}`")]
    Duplicate { name: String },
    #[error("service `{service}` depends on `{dep}`, which is not a service")]
    UnknownDep { service: String, dep: String },
    #[error("dependency cycle: {}", Cycle(.cycle))]
    Cycle {
        /// The services on the cycle, the first repeated at the end: `a -> b -> a`.
        cycle: Vec<String>,
    },
}

struct Cycle<'a>(&'a [String]);

impl fmt::Display for Cycle<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(" -> "))
    }
}

/// Orders services so that each comes after all its dependencies.
///
/// `services[i]` is `(name, deps)`. Among services with no constraint between them the input
/// order is kept, so the result is deterministic.
pub fn start_order<S: AsRef<str>>(services: &[(S, Vec<S>)]) -> Result<Vec<usize>, OrderError> {
    let names: Vec<&str> = services.iter().map(|(name, _)| name.as_ref()).collect();
    for (i, name) in names.iter().enumerate() {
        if names[..i].contains(name) {
            return Err(OrderError::Duplicate {
                name: name.to_string(),
            });
        }
    }
    let mut edges = Vec::with_capacity(services.len());
    for (name, deps) in services {
        let mut resolved = Vec::with_capacity(deps.len());
        for dep in deps {
            let dep = dep.as_ref();
            let Some(j) = names.iter().position(|n| *n == dep) else {
                return Err(OrderError::UnknownDep {
                    service: name.as_ref().to_string(),
                    dep: dep.to_string(),
                });
            };
            resolved.push(j);
        }
        edges.push(resolved);
    }

    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    let mut marks = vec![Mark::New; services.len()];
    let mut order = Vec::with_capacity(services.len());
    // Iterative depth-first search; `path` holds (node, next edge to follow).
    for root in 0..services.len() {
        if marks[root] != Mark::New {
            continue;
        }
        let mut path = vec![(root, 0usize)];
        marks[root] = Mark::OnPath;
        while let Some(&mut (node, ref mut next)) = path.last_mut() {
            if let Some(&dep) = edges[node].get(*next) {
                *next += 1;
                match marks[dep] {
                    Mark::Done => {}
                    Mark::New => {
                        marks[dep] = Mark::OnPath;
                        path.push((dep, 0));
                    }
                    Mark::OnPath => {
                        let start = path.iter().position(|&(n, _)| n == dep).unwrap_or(0);
                        let mut cycle: Vec<String> = path[start..]
                            .iter()
                            .map(|&(n, _)| names[n].to_string())
                            .collect();
                        cycle.push(names[dep].to_string());
                        return Err(OrderError::Cycle { cycle });
                    }
                }
            } else {
                marks[node] = Mark::Done;
                order.push(node);
                path.pop();
            }
        }
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `graph` is `name:dep,dep name:dep ...`; `expected` the order or the error message.
    fn check(graph: &str, expected: &str) {
        let services: Vec<(&str, Vec<&str>)> = graph
            .split_whitespace()
            .map(|item| {
                let (name, deps) = item.split_once(':').unwrap_or((item, ""));
                (name, deps.split(',').filter(|d| !d.is_empty()).collect())
            })
            .collect();
        let got = match start_order(&services) {
            Ok(order) => order
                .iter()
                .map(|&i| services[i].0)
                .collect::<Vec<_>>()
                .join(" "),
            Err(e) => e.to_string(),
        };
        assert_eq!(got, expected, "graph: {graph}");
    }

    #[test]
    fn orders() {
        check("", "");
        check("a b c", "a b c");
        check("app:db db", "db app");
        check("web:app app:db db firewall", "db app web firewall");
        check("a:b,c b:c c", "c b a");
        check("x:z y z:y", "y z x");
    }

    #[test]
    fn errors() {
        check("a:b", "service `a` depends on `b`, which is not a service");
        check("a a", "two services are named `a`");
        check("a:a", "dependency cycle: a -> a");
        check("a:b b:c c:a", "dependency cycle: a -> b -> c -> a");
        check("ok a:b b:c c:b", "dependency cycle: b -> c -> b");
    }
}
