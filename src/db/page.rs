//! Pages of the newest-first lists (datasets, jobs, models). A page continues after the last row
//! of the previous one by that row's place in the order (its creation time, then its id), not by
//! an offset: rows created or deleted between two requests neither repeat nor drop out of the
//! pages, and the row a cursor names may itself be gone.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The condition and order of a page of a newest-first list, as a literal for `concat!`, after
/// `where`: placeholders for the cursor's creation time and id (null for the first page) and for
/// the number of rows to fetch ([`Page::fetch`]).
macro_rules! newest_first_page {
    ($created_at:literal, $id:literal, $rows:literal) => {
        concat!(
            "(", $created_at, " is null or created_at < ", $created_at, " or (created_at = ", $created_at, " and id < ", $id, ")) ",
            "order by created_at desc, id desc limit ", $rows
        )
    };
}

/// The most rows a page may hold.
pub const MAX_LIMIT: u32 = 1000;

/// Which rows of a newest-first list to answer: at most `limit` (all without one), after `after`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    pub limit: Option<u32>,
    pub after: Option<Cursor>,
}

/// A row's place in a newest-first list: the page after it holds the rows older than it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub created_at: String,
    pub id: String,
}

/// A page of rows, and where the next one starts (none: this was the last).
#[derive(Debug)]
pub struct Listed<T> {
    pub rows: Vec<T>,
    pub next: Option<Cursor>,
}

impl Page {
    /// Every row (no limit, from the newest).
    pub fn all() -> Self {
        Self::default()
    }

    /// The page that `limit` and `cursor` (as a client sends them) name, or why they name none.
    pub fn parse(limit: Option<u32>, cursor: Option<&str>) -> Result<Self, String> {
        if let Some(n) = limit
            && !(1..=MAX_LIMIT).contains(&n)
        {
            return Err(format!("limit must be between 1 and {MAX_LIMIT}"));
        }
        let after = cursor.map(Cursor::decode).transpose()?;
        Ok(Self { limit, after })
    }

    /// The placeholders' values of [`newest_first_page!`], in order.
    pub fn binds(&self) -> (Option<&str>, Option<&str>, i64) {
        // One row more than asked tells whether another page follows.
        let rows = self.limit.map_or(i64::MAX, |n| i64::from(n) + 1);
        (self.after.as_ref().map(|c| c.created_at.as_str()), self.after.as_ref().map(|c| c.id.as_str()), rows)
    }

    /// The page out of the rows [`Page::binds`] fetched, `place` telling each row's cursor.
    pub fn fetch<T>(&self, mut rows: Vec<T>, place: impl Fn(&T) -> Cursor) -> Listed<T> {
        let next = match self.limit {
            Some(n) if rows.len() > n as usize => {
                rows.truncate(n as usize);
                rows.last().map(place)
            }
            _ => None,
        };
        Listed { rows, next }
    }
}

impl Cursor {
    /// The cursor as the `cursor` query parameter carries it: opaque to clients, URL-safe.
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(format!("{} {}", self.created_at, self.id))
    }

    /// A cursor [`Cursor::encode`] made, or why `text` is not one.
    pub fn decode(text: &str) -> Result<Self, String> {
        let refused = || format!("cursor '{text}' is not one this service gave: take it from the Link header (rel=\"next\") of the previous page");
        let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|_| refused())?;
        let plain = String::from_utf8(bytes).map_err(|_| refused())?;
        let (created_at, id) = plain.split_once(' ').ok_or_else(refused)?;
        // Any text would only give a strange page, but a cursor that is not ours is a client's
        // mistake worth naming.
        if chrono::DateTime::parse_from_rfc3339(created_at).is_err() || id.is_empty() || id.contains(char::is_whitespace) {
            return Err(refused());
        }
        Ok(Self { created_at: created_at.to_string(), id: id.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_reads_back_and_anything_else_is_refused() {
        let cursor = Cursor { created_at: "2026-12-05T09:20:22.185Z".into(), id: "01a24581-28a9-74d3-952b-357e9d9f03c0".into() };
        let text = cursor.encode();
        assert!(text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{text}");
        assert_eq!(Cursor::decode(&text), Ok(cursor.clone()));
        let page = Page::parse(Some(2), Some(&text)).unwrap();
        assert_eq!(page.binds(), (Some("2026-12-05T09:20:22.185Z"), Some("01a24581-28a9-74d3-952b-357e9d9f03c0"), 3));
        assert_eq!(Page::all().binds(), (None, None, i64::MAX));
        for bad in ["", "!!", "bm90IGEgY3Vyc29y", &URL_SAFE_NO_PAD.encode("yesterday abc"), &URL_SAFE_NO_PAD.encode("2026-12-05T09:20:22.185Z ")] {
            let e = Cursor::decode(bad).unwrap_err();
            assert!(e.contains("is not one this service gave"), "{bad}: {e}");
        }
        assert_eq!(Page::parse(Some(0), None).unwrap_err(), "limit must be between 1 and 1000");
        assert!(Page::parse(Some(1001), None).is_err());
        assert_eq!(Page::parse(Some(1000), None).unwrap().limit, Some(1000));
    }

    #[test]
    fn a_page_keeps_its_limit_and_names_where_the_next_starts() {
        let place = |n: &u32| Cursor { created_at: "2026-12-05T00:00:00.000Z".into(), id: n.to_string() };
        let page = Page { limit: Some(2), after: None };
        let listed = page.fetch(vec![5, 4, 3], place);
        assert_eq!((listed.rows, listed.next.map(|c| c.id)), (vec![5, 4], Some("4".to_string())));
        let last = page.fetch(vec![2, 1], place);
        assert_eq!((last.rows, last.next), (vec![2, 1], None), "exactly the limit left: no next page");
        let all = Page::all().fetch(vec![3, 2, 1], place);
        assert_eq!((all.rows.len(), all.next), (3, None));
    }
}
