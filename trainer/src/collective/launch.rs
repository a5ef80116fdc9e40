//! How the process was launched: the environment MPI launchers set for each rank.

/// What the environment says about this process's launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    /// The launcher, in words.
    pub launcher: &'static str,
    /// The number of ranks it started.
    pub size: usize,
    /// This process's rank.
    pub rank: usize,
}

/// The variables each launcher sets: (launcher, world size, rank).
const LAUNCHERS: [(&str, &str, &str); 3] = [
    (
        "mpirun (Open MPI)",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_RANK",
    ),
    ("mpiexec (MPICH, Intel MPI)", "PMI_SIZE", "PMI_RANK"),
    // `srun` sets these for the tasks of a job step (not for the batch script itself,
    // whose SLURM_NTASKS describes the allocation).
    ("srun (Slurm)", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID"),
];

/// The launch described by `env` (a variable lookup), or `None` when no launcher started
/// this process. Values that do not parse count as absent.
pub fn detect(env: impl Fn(&str) -> Option<String>) -> Option<Launch> {
    LAUNCHERS.iter().find_map(|&(launcher, size, rank)| {
        let size = env(size)?.trim().parse().ok()?;
        let rank = env(rank).and_then(|r| r.trim().parse().ok()).unwrap_or(0);
        Some(Launch {
            launcher,
            size,
            rank,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn finds_each_launcher() {
        assert_eq!(detect(env(&[])), None);
        let l = detect(env(&[
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_RANK", "2"),
        ]));
        assert_eq!(
            l,
            Some(Launch {
                launcher: "mpirun (Open MPI)",
                size: 4,
                rank: 2
            })
        );
        let l = detect(env(&[("PMI_SIZE", "2"), ("PMI_RANK", "1")])).unwrap();
        assert_eq!((l.size, l.rank), (2, 1));
        let l = detect(env(&[("SLURM_STEP_NUM_TASKS", "8"), ("SLURM_PROCID", "5")])).unwrap();
        assert_eq!((l.launcher, l.size, l.rank), ("srun (Slurm)", 8, 5));
    }

    #[test]
    fn a_batch_script_or_garbage_is_no_launch() {
        // sbatch -n 4 sets SLURM_NTASKS for the script, which is still one process.
        assert_eq!(
            detect(env(&[("SLURM_NTASKS", "4"), ("SLURM_PROCID", "0")])),
            None
        );
        assert_eq!(detect(env(&[("OMPI_COMM_WORLD_SIZE", "many")])), None);
    }
}
