//! The arithmetic of a run, without any server: percentiles and the ramp schedule.

use std::time::Duration;

use chatfleet_loadtest::plan::{Scenario, ramp_offsets};
use chatfleet_loadtest::report::LatencyHistogram;

/// hdrhistogram keeps three significant digits.
fn assert_close(actual: f64, expected: f64) {
    assert!((actual - expected).abs() <= expected * 0.001, "{actual} is not within 0.1% of {expected}");
}

#[test]
fn percentiles_of_one_to_a_hundred_milliseconds_are_the_nearest_ranks() {
    let mut histogram = LatencyHistogram::default();
    for ms in 1..=100 {
        histogram.record(Duration::from_millis(ms));
    }

    let summary = histogram.summary();

    assert_eq!(summary.count, 100);
    assert_close(summary.min_ms, 1.0);
    assert_close(summary.p50_ms, 50.0);
    assert_close(summary.p90_ms, 90.0);
    assert_close(summary.p99_ms, 99.0);
    assert_close(summary.p999_ms, 100.0);
    assert_close(summary.max_ms, 100.0);
    assert_close(summary.mean_ms, 50.5);
}

#[test]
fn a_single_slow_value_shows_only_in_the_tail() {
    let mut histogram = LatencyHistogram::default();
    for _ in 0..999 {
        histogram.record(Duration::from_millis(10));
    }
    histogram.record(Duration::from_secs(5));

    let summary = histogram.summary();

    assert_close(summary.p50_ms, 10.0);
    assert_close(summary.p99_ms, 10.0);
    assert_close(summary.p999_ms, 10.0);
    assert_close(summary.max_ms, 5000.0);
}

#[test]
fn sub_millisecond_latencies_keep_their_microseconds() {
    let mut histogram = LatencyHistogram::default();
    histogram.record(Duration::from_micros(250));

    assert_close(histogram.summary().p50_ms, 0.25);
}

#[test]
fn a_ramp_schedules_user_i_at_i_over_the_rate() {
    let offsets = ramp_offsets(4.0, Duration::from_secs(1));

    assert_eq!(offsets, [0, 250, 500, 750].map(Duration::from_millis));
}

#[test]
fn a_long_ramp_accumulates_no_rounding_error() {
    let offsets = ramp_offsets(3.0, Duration::from_secs(1000));

    assert_eq!(offsets.len(), 3000);
    assert_eq!(offsets[2999], Duration::from_secs_f64(2999.0 / 3.0));
    assert!(offsets.windows(2).all(|pair| pair[0] < pair[1]));
}

#[test]
fn burst_and_conversation_users_all_start_at_once() {
    let burst = Scenario::Burst { users: 3 };
    let conversation = Scenario::Conversation { users: 2, turns: 4, think: Duration::from_millis(5) };

    assert_eq!(burst.start_offsets(), vec![Duration::ZERO; 3]);
    assert_eq!(conversation.start_offsets(), vec![Duration::ZERO; 2]);
    assert_eq!(conversation.planned_messages(), 8);
}
