use super::*;
use crate::backend::cpu::CpuBackend;
use crate::backend::Memory;
use crate::collective::conformance;
use std::sync::mpsc;
use std::time::Duration;

/// `run(size, 1, f)` on another thread; panics if it has not returned within a minute (a
/// hang), so a test that would hang fails instead.
fn run_within<T, F>(size: usize, f: F) -> std::result::Result<Vec<T>, RanksError<String>>
where
    T: Send + 'static,
    F: Fn(&Threads) -> std::result::Result<T, String> + Send + Sync + 'static,
{
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(run(size, 1, f));
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the ranks hung (no result within 60 s)")
}

#[test]
fn one_two_and_three_ranks_pass_the_conformance_checks() {
    for size in 1..=3 {
        let ranks = run_within(size, |comm| {
            conformance::check(comm, &CpuBackend::default())?;
            Ok((comm.rank(), comm.size(), comm.local_rank()))
        })
        .unwrap_or_else(|e| panic!("{size} ranks: {e}"));
        let want: Vec<_> = (0..size).map(|r| (r, size, r)).collect();
        assert_eq!(ranks, want);
    }
}

#[test]
fn each_rank_runs_in_its_own_pool_of_the_threads_asked_for() {
    let per_rank = run(2, 1, |_| Ok::<_, String>(rayon::current_num_threads())).unwrap();
    assert_eq!(per_rank, [1, 1]);
    let per_rank = run(2, 3, |_| Ok::<_, String>(rayon::current_num_threads())).unwrap();
    assert_eq!(per_rank, [3, 3]);
}

/// Many operations in a row, of changing lengths and kinds, without barriers between them:
/// a rank that raced ahead into the next operation would corrupt a sum here.
#[test]
fn back_to_back_operations_keep_their_values_apart() {
    let sums = run_within(3, |comm| {
        let r = comm.rank() as f64;
        let be = CpuBackend::default();
        let mut out = Vec::new();
        for i in 0..300usize {
            let len = 1 + (i * 7) % 50;
            let mut v: Vec<f64> = (0..len).map(|j| r * 1000.0 + (i + j) as f64).collect();
            comm.all_reduce_sum_f64(&mut v).map_err(|e| e.to_string())?;
            for (j, &x) in v.iter().enumerate() {
                let want = 3000.0 + 3.0 * (i + j) as f64;
                if x != want {
                    return Err(format!("op {i} element {j}: {x} != {want}"));
                }
            }
            let host: Vec<f32> = (0..len).map(|j| (r as f32) + j as f32).collect();
            let mut bufs = vec![be.upload(&host).map_err(|e| e.to_string())?];
            if i % 3 == 0 {
                comm.broadcast(&be, &mut bufs).map_err(|e| e.to_string())?;
                let got = be.download(&bufs[0]).map_err(|e| e.to_string())?;
                if got.iter().enumerate().any(|(j, &x)| x != j as f32) {
                    return Err(format!("broadcast {i}: {got:?}"));
                }
            } else {
                comm.all_reduce_sum(&be, &mut bufs)
                    .map_err(|e| e.to_string())?;
                let got = be.download(&bufs[0]).map_err(|e| e.to_string())?;
                if got
                    .iter()
                    .enumerate()
                    .any(|(j, &x)| x != 3.0 + 3.0 * j as f32)
                {
                    return Err(format!("sum {i}: {got:?}"));
                }
            }
            out.push(v[0]);
        }
        Ok(out)
    })
    .unwrap();
    assert!(sums.windows(2).all(|w| w[0] == w[1]));
}

#[test]
fn an_error_on_one_rank_stops_the_others_and_is_the_jobs_error() {
    let err = run_within(3, |comm| {
        if comm.rank() == 1 {
            return Err("rank 1's disk is full".to_string());
        }
        // The others wait for rank 1 in a collective that can never complete.
        let mut v = [1.0];
        match comm.all_reduce_sum_f64(&mut v) {
            Err(CollectiveError::RankStopped {
                rank: 1,
                size: 3,
                failed: true,
            }) => Err("stopped".to_string()),
            other => Ok(format!("{other:?}")),
        }
    })
    .expect_err("the job must fail");
    assert_eq!(
        err.to_string(),
        "Error on rank 1 of 3: rank 1's disk is full"
    );
    assert!(matches!(
        err,
        RanksError::Failed {
            rank: 1,
            size: 3,
            ..
        }
    ));
}

#[test]
fn a_panic_on_one_rank_stops_the_others_and_names_the_rank() {
    let err = run_within(2, |comm| {
        comm.barrier().map_err(|e| e.to_string())?;
        if comm.rank() == 0 {
            panic!("rank 0 broke");
        }
        comm.barrier().map_err(|e| e.to_string())?;
        Ok(())
    })
    .expect_err("the job must fail");
    match &err {
        RanksError::Panicked {
            rank: 0,
            size: 2,
            message,
        } => {
            assert!(message.contains("rank 0 broke"), "{message}")
        }
        other => panic!("expected rank 0's panic, got {other:?}"),
    }
    assert!(err
        .to_string()
        .starts_with("Error on rank 0 of 2: it panicked"));
}

#[test]
fn a_rank_that_finishes_early_does_not_leave_the_others_waiting() {
    let err = run_within(2, |comm| {
        if comm.rank() == 0 {
            return Ok(());
        }
        comm.barrier().map_err(|e| e.to_string())
    })
    .expect_err("rank 1 waits for a rank that left");
    match err {
        RanksError::Failed { rank: 1, error, .. } => {
            assert!(error.contains("rank 0 of 2 finished"), "{error}")
        }
        other => panic!("expected rank 1's error, got {other:?}"),
    }
}

#[test]
fn chunks_cover_the_vector_once() {
    for len in [0, 1, 2, 5, 1001] {
        for n in 1..=4 {
            let got: Vec<usize> = (0..n).flat_map(|i| chunk(len, n, i)).collect();
            assert_eq!(got, (0..len).collect::<Vec<_>>(), "len {len}, {n} chunks");
        }
    }
}
