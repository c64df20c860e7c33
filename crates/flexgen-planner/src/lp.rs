//! The linear program over the placement fractions for one discrete choice, solved with `HiGHS`
//! through `good_lp`. Kept behind this one function so that the rest of the planner never sees the
//! solver.

use good_lp::{
    Expression, ProblemVariables, Solution, SolverModel, Variable, constraint, variable,
};

use crate::cost::{Lin, Terms};

/// Capacities (bytes) the plan may fill, after margins.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Capacity {
    pub(crate) gpu: f64,
    pub(crate) cpu: f64,
    pub(crate) disk: f64,
}

/// Optional fixed fractions (evaluation of a given placement instead of a search).
pub(crate) type Fixed = Option<[f64; 6]>;

fn expr(l: &Lin, x: &[Variable; 6]) -> Expression {
    let mut e = Expression::from(l.constant);
    for (c, v) in l.coef.iter().zip(x) {
        if *c != 0.0 {
            e += *c * *v;
        }
    }
    e
}

/// Minimizes one block's time; returns the fractions `[wg, wc, wn, cg, cc, cn]`, or `None` when
/// no placement fits. Streaming any weight costs the GPU two layers of staging, a step that a
/// linear term cannot express, so this solves two programs, every weight resident and some
/// streamed, and keeps the faster (a mixed-integer program with one binary took 6× as long).
pub(crate) fn solve(terms: &Terms, cap: Capacity, fixed: Fixed) -> Option<[f64; 6]> {
    let resident = fixed.is_none_or(|f| f[0] >= 1.0 - 1e-9);
    let streamed = fixed.is_none_or(|f| f[0] < 1.0 - 1e-9);
    let a = resident.then(|| solve_one(terms, cap, fixed, false)).flatten();
    let b = streamed.then(|| solve_one(terms, cap, fixed, true)).flatten();
    match (a, b) {
        (Some(a), Some(b)) => Some(if a.1 <= b.1 { a.0 } else { b.0 }),
        (a, b) => a.or(b).map(|s| s.0),
    }
}

/// One program: with `streams`, the streaming buffers are held and weights may leave the GPU;
/// without, every weight stays on it. Returns the fractions and the objective.
fn solve_one(terms: &Terms, cap: Capacity, fixed: Fixed, streams: bool) -> Option<([f64; 6], f64)> {
    let mut vars = ProblemVariables::new();
    let x: [Variable; 6] = std::array::from_fn(|i| match fixed {
        Some(f) => vars.add(variable().min(f[i]).max(f[i])),
        None if i == 0 && !streams => vars.add(variable().min(1.0).max(1.0)),
        None => vars.add(variable().min(0.0).max(1.0)),
    });
    let t_pre = vars.add(variable().min(0.0));
    let t_gen = vars.add(variable().min(0.0));
    let l = terms.num_layers;
    // Ties (a compute-bound block does not care where the bytes wait) go to the faster tier: a
    // microsecond per share off the GPU, two on disk, far below any time that matters.
    let tie = 1e-6 * (x[1] + 2.0 * x[2] + x[4] + 2.0 * x[5]);
    let objective = l * t_pre + (terms.gen_len - 1.0).max(0.0) * l * t_gen + tie;
    let mut model = vars.minimise(objective.clone()).using(good_lp::highs);
    model.set_verbose(false);
    model = model.set_threads(1);
    model.add_constraint(constraint!(x[0] + x[1] + x[2] == 1.0));
    model.add_constraint(constraint!(x[3] + x[4] + x[5] == 1.0));
    if fixed.is_none() && !terms.cache_on_disk {
        model.add_constraint(constraint!(x[5] == 0.0));
    }
    for (_, t) in &terms.prefill {
        model.add_constraint(constraint!(expr(t, &x) <= t_pre));
    }
    for (_, t) in &terms.decode {
        model.add_constraint(constraint!(expr(t, &x) <= t_gen));
    }
    let staging = if streams { terms.gpu_streaming } else { 0.0 };
    model.add_constraint(constraint!(expr(&terms.gpu, &x) + staging <= cap.gpu));
    model.add_constraint(constraint!(expr(&terms.cpu, &x) <= cap.cpu));
    model.add_constraint(constraint!(expr(&terms.disk, &x) <= cap.disk));
    let sol = model.solve().ok()?;
    let value = sol.eval(&objective);
    Some((std::array::from_fn(|i| sol.value(x[i]).clamp(0.0, 1.0)), value))
}
