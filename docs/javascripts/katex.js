// Maths for pymdownx.arithmatex (generic mode), rendered by KaTeX from files served with the site, so the pages
// render offline too. arithmatex wraps \(...\) inline and \[...\] display maths in elements of class
// "arithmatex"; only those are rendered. Vendored: KaTeX 0.19.1 from the npm package `katex` (dist/katex.min.js,
// katex.min.css, contrib/auto-render.min.js and the woff2 fonts; MIT licence in katex/LICENSE).
document$.subscribe(() => {
  for (const element of document.querySelectorAll(".arithmatex")) {
    renderMathInElement(element, {
      delimiters: [
        { left: "\\(", right: "\\)", display: false },
        { left: "\\[", right: "\\]", display: true },
      ],
      throwOnError: false,
    });
  }
});
