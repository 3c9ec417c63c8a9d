//! A working set that checks itself (`serve --memory-mb N`): N MiB of pages, each holding a
//! pattern of its index and its generation. A thread walks them without end: it checks every
//! word of a page against the pattern it last wrote there, then writes the next generation. A
//! page that moved wrong (lost, zero-filled, stale, from another page) fails the check and is
//! counted. The server answers a `MEM` line (the container's file system is read-only, so the
//! figures travel on its own protocol) after checking every page once more, there and then:
//! `MEM {"mb":N,"passes":P,"pages_checked":C,"bad_pages":B,"first_bad":null|{page,word,got,want},
//! "bad_now":K}` (`bad_now`: pages wrong in that check; `null` before the set is filled).

use std::{sync::Mutex, time::Duration};

/// The working set, shared by the walking thread and the server's `MEM` answer.
static SET: Mutex<Option<(usize, Working)>> = Mutex::new(None);

fn set() -> std::sync::MutexGuard<'static, Option<(usize, Working)>> {
    SET.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the server answers to `MEM`: every page checked now, and the walk's figures (`null`:
/// no working set, or not filled yet). Blocks the walk while it checks (well under a second
/// for 256 MiB in a release build).
pub fn last_report() -> String {
    match set().as_ref() {
        None => "null".into(),
        Some((mb, ws)) => {
            let mut r: serde_json::Value =
                serde_json::from_str(&ws.report(*mb)).unwrap_or_default();
            r["bad_now"] = ws.check_all().into();
            r.to_string()
        }
    }
}

const PAGE_WORDS: usize = 4096 / 8;
/// Pages per step (1 MiB); the steps are paced to the rate asked for, so the walk keeps
/// writing without taking a whole CPU from the server beside it.
const STEP_PAGES: usize = 256;

/// The word `w` of page `page` at generation `generation`.
fn pattern(page: usize, generation: u64, w: usize) -> u64 {
    let x = (page as u64) << 20 ^ generation.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ w as u64;
    x.wrapping_mul(0xBF58_476D_1CE4_E5B9) | 1
}

/// The first wrong word found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bad {
    pub page: usize,
    pub word: usize,
    pub got: u64,
    pub want: u64,
}

/// The working set: its pages and each page's generation.
pub struct Working {
    words: Vec<u64>,
    generations: Vec<u64>,
    pub passes: u64,
    pub pages_checked: u64,
    pub bad_pages: u64,
    pub first_bad: Option<Bad>,
}

impl Working {
    /// `mb` MiB, every page written (generation 0), so all of it is resident.
    pub fn new(mb: usize) -> Self {
        let pages = mb * 256;
        let mut words = vec![0u64; pages * PAGE_WORDS];
        for (p, page) in words.chunks_mut(PAGE_WORDS).enumerate() {
            for (w, v) in page.iter_mut().enumerate() {
                *v = pattern(p, 0, w);
            }
        }
        Self {
            words,
            generations: vec![0; pages],
            passes: 0,
            pages_checked: 0,
            bad_pages: 0,
            first_bad: None,
        }
    }

    pub fn pages(&self) -> usize {
        self.generations.len()
    }

    /// Checks page `p` against its generation, then writes the next one.
    pub fn step(&mut self, p: usize) {
        let generation = self.generations[p];
        let page = &mut self.words[p * PAGE_WORDS..(p + 1) * PAGE_WORDS];
        let mut bad = None;
        for (w, v) in page.iter().enumerate() {
            let want = pattern(p, generation, w);
            if *v != want {
                bad = Some(Bad {
                    page: p,
                    word: w,
                    got: *v,
                    want,
                });
                break;
            }
        }
        if let Some(b) = bad {
            self.bad_pages += 1;
            self.first_bad.get_or_insert(b);
        }
        let next = generation + 1;
        for (w, v) in page.iter_mut().enumerate() {
            *v = pattern(p, next, w);
        }
        self.generations[p] = next;
        self.pages_checked += 1;
    }

    /// Checks every page against its generation without writing: how many are wrong.
    pub fn check_all(&self) -> u64 {
        let mut bad = 0;
        for (p, page) in self.words.chunks(PAGE_WORDS).enumerate() {
            let generation = self.generations[p];
            if page
                .iter()
                .enumerate()
                .any(|(w, v)| *v != pattern(p, generation, w))
            {
                bad += 1;
            }
        }
        bad
    }

    /// For tests: spoils one word.
    pub fn corrupt(&mut self, page: usize, word: usize) {
        self.words[page * PAGE_WORDS + word] ^= 1;
    }

    pub fn report(&self, mb: usize) -> String {
        let first_bad = match self.first_bad {
            Some(b) => {
                serde_json::json!({"page": b.page, "word": b.word, "got": b.got, "want": b.want})
            }
            None => serde_json::Value::Null,
        };
        serde_json::json!({
            "mb": mb,
            "passes": self.passes,
            "pages_checked": self.pages_checked,
            "bad_pages": self.bad_pages,
            "first_bad": first_bad,
        })
        .to_string()
    }
}

/// Starts the thread that fills the working set, then walks it, `mb_per_s` MiB checked and rewritten per second at most (it
/// never ends; the process does).
pub fn start(mb: usize, mb_per_s: u32) -> std::io::Result<()> {
    let step = Duration::from_secs(1) / mb_per_s.max(1);
    std::thread::Builder::new()
        .name("memory".into())
        .spawn(move || {
            // Filled here, not before the server listens (a debug build takes seconds).
            let ws = Working::new(mb);
            let pages = ws.pages();
            *set() = Some((mb, ws));
            let mut next = std::time::Instant::now();
            loop {
                for start in (0..pages).step_by(STEP_PAGES) {
                    if let Some((_, ws)) = set().as_mut() {
                        for p in start..(start + STEP_PAGES).min(pages) {
                            ws.step(p);
                        }
                    }
                    // Paced against a schedule, not a fixed sleep: a stop (a migration)
                    // does not make it race to catch up.
                    next = (next + step).max(std::time::Instant::now() - step);
                    if let Some(d) = next.checked_duration_since(std::time::Instant::now()) {
                        std::thread::sleep(d);
                    }
                }
                if let Some((_, ws)) = set().as_mut() {
                    ws.passes += 1;
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_walk_finds_nothing_and_a_spoiled_word_is_found() {
        let mut ws = Working::new(1);
        assert_eq!(ws.pages(), 256);
        for _ in 0..3 {
            for p in 0..ws.pages() {
                ws.step(p);
            }
        }
        assert_eq!(ws.bad_pages, 0);
        assert_eq!(ws.pages_checked, 3 * 256);
        ws.corrupt(17, 5);
        assert_eq!(ws.check_all(), 1);
        for p in 0..ws.pages() {
            ws.step(p);
        }
        assert_eq!(ws.bad_pages, 1);
        let b = ws.first_bad.unwrap();
        assert_eq!((b.page, b.word), (17, 5));
        assert_eq!(b.got ^ 1, b.want);
        // Rewritten: the next pass is clean again, the count stays.
        for p in 0..ws.pages() {
            ws.step(p);
        }
        assert_eq!(ws.bad_pages, 1);
        assert_eq!(ws.check_all(), 0);
        let r: serde_json::Value = serde_json::from_str(&ws.report(1)).unwrap();
        assert_eq!(r["bad_pages"], 1);
        assert_eq!(r["first_bad"]["page"], 17);
    }

    #[test]
    fn a_stale_or_zeroed_page_is_bad() {
        let mut ws = Working::new(1);
        let old: Vec<u64> = ws.words[..PAGE_WORDS].to_vec();
        ws.step(0);
        // Page 0 back at generation 0 (a page that did not move with the last write).
        ws.words[..PAGE_WORDS].copy_from_slice(&old);
        // Page 1 zero-filled (a lazy page never delivered).
        ws.words[PAGE_WORDS..2 * PAGE_WORDS].fill(0);
        ws.step(0);
        ws.step(1);
        assert_eq!(ws.bad_pages, 2);
    }
}
