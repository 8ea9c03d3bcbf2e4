//! A generated Hugo site, for tests that watch Hugo build it.
use std::{fmt::Write as _, path::Path};

/// A Hugo site of `pages` posts with a few paragraphs, tags and a list.
pub fn site(dir: &Path, pages: usize) {
    let w = |p: &str, s: &str| {
        let path = dir.join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, s).unwrap();
    };
    w(
        "hugo.toml",
        "baseURL = 'http://example.org/'\ntitle = 'gopulse'\n[taxonomies]\ntag = 'tags'\n",
    );
    w(
        "layouts/_default/baseof.html",
        "<html><body>{{ block \"main\" . }}{{ end }}</body></html>",
    );
    w(
        "layouts/_default/single.html",
        "{{ define \"main\" }}<h1>{{ .Title }}</h1>{{ .Content }}{{ range .Params.tags }}<a>{{ . }}</a>{{ end }}{{ end }}",
    );
    w(
        "layouts/_default/list.html",
        "{{ define \"main\" }}<ul>{{ range .Pages }}<li><a href=\"{{ .RelPermalink }}\">{{ .Title }}</a></li>{{ end }}</ul>{{ end }}",
    );
    for i in 0..pages {
        let mut body = format!(
            "---\ntitle: Post {i}\ntags: [t{}, t{}]\n---\n",
            i % 50,
            i % 7
        );
        for p in 0..4 {
            let _ = writeln!(
                body,
                "Paragraph {p} of post {i}, with *emphasis*, `code` and a [link](/posts/p{}/).\n",
                (i + p) % pages
            );
        }
        w(&format!("content/posts/p{i}.md"), &body);
    }
}
