//! UI frame-time statistics (the time `ui()` takes), kept for the last frames.

use std::collections::VecDeque;
use std::time::Duration;

/// A rolling window of frame times.
#[derive(Debug, Clone)]
pub struct FrameStats {
    times: VecDeque<Duration>,
    capacity: usize,
}

impl Default for FrameStats {
    fn default() -> Self {
        Self::with_capacity(600)
    }
}

impl FrameStats {
    /// Keeps the last `capacity` frames.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            times: VecDeque::with_capacity(capacity),
            capacity: capacity.max(1),
        }
    }

    /// Records one frame.
    pub fn record(&mut self, t: Duration) {
        if self.times.len() == self.capacity {
            self.times.pop_front();
        }
        self.times.push_back(t);
    }

    /// Frames held.
    pub fn len(&self) -> usize {
        self.times.len()
    }

    /// True when no frame was recorded.
    pub fn is_empty(&self) -> bool {
        self.times.is_empty()
    }

    /// Forgets every frame.
    pub fn clear(&mut self) {
        self.times.clear();
    }

    /// The `q`-quantile (0..=1, nearest rank) in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> Option<f32> {
        if self.times.is_empty() {
            return None;
        }
        let mut v: Vec<Duration> = self.times.iter().copied().collect();
        v.sort_unstable();
        let rank = ((q.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize).clamp(1, v.len());
        Some(v[rank - 1].as_secs_f32() * 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_by_nearest_rank() {
        let mut s = FrameStats::with_capacity(100);
        assert_eq!(s.quantile_ms(0.5), None);
        for ms in 1..=100 {
            s.record(Duration::from_millis(ms));
        }
        assert_eq!(s.quantile_ms(0.5), Some(50.0));
        assert_eq!(s.quantile_ms(0.99), Some(99.0));
        s.record(Duration::from_millis(1000));
        assert_eq!(s.len(), 100);
        assert_eq!(s.quantile_ms(1.0), Some(1000.0));
    }
}
