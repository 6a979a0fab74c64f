//! The CLI's one table printer: a header row, then columns as wide as their
//! widest cell, two spaces apart; the columns named as numeric are
//! right-aligned; no trailing spaces.

use std::fmt::Write;

/// `rows` under `headers`, the columns headed by a name in `right`
/// right-aligned. A row shorter than the header leaves its last cells
/// empty.
pub(crate) fn render(headers: &[&str], right: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for ((cell, w), header) in cells.zip(&widths).zip(headers) {
            if right.contains(header) {
                let _ = write!(l, "{cell:>w$}  ");
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        let _ = writeln!(out, "{}", l.trim_end());
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_and_numbers_go_right() {
        let t = render(
            &["ID", "KIND", "SIZE"],
            &["SIZE"],
            &[
                vec!["a-000001".into(), "savepoint".into(), "1.5 MiB".into()],
                vec!["b".into(), "checkpoint".into(), "0 B".into()],
            ],
        );
        assert_eq!(
            t,
            "ID        KIND           SIZE\n\
             a-000001  savepoint   1.5 MiB\n\
             b         checkpoint      0 B\n"
        );
        assert_eq!(render(&["A", "B"], &[], &[vec!["x".into()]]), "A  B\nx\n");
    }
}
