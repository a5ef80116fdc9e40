//! Helpers shared by the report's unit tests.

use super::MetricRecord;

pub(super) fn sample_records() -> Vec<MetricRecord> {
    vec![
        MetricRecord {
            event: Some("start".into()),
            ..MetricRecord::new(0, 0, 0.0)
        },
        MetricRecord {
            train_bpd: Some(5.25),
            images_per_sec: Some(1234.5),
            lr: Some(1e-3),
            ..MetricRecord::new(100, 0, 12.5)
        },
        MetricRecord {
            train_bpd: Some(2.0),
            val_bpd: Some(2.125),
            ..MetricRecord::new(200, 1, 25.0)
        },
        MetricRecord {
            train_bpd: Some(1.5),
            lr: Some(5e-4),
            event: Some("say \"hi\"\nnewline".into()),
            ..MetricRecord::new(300, 1, 37.5)
        },
    ]
}
