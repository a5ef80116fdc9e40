//! Root package of the clayflow workspace: owns tests/ and benches/.
