// A small Markdown renderer for chat answers: the text is escaped first, so model output can never inject HTML.
// Fenced code blocks (highlighted), inline code, headings, bold, italics, lists, block quotes, http(s) links.
"use strict";
(function () {
  const KEYWORDS = new Set(("if else elif for while do return function def class import from as let const var new " +
    "try catch except finally raise throw await async yield in of not and or is None null true false True False " +
    "self this public private static void int float double char bool string struct fn pub use mut match impl " +
    "switch case break continue package go defer select type interface enum echo print lambda with pass").split(" "));

  function escapeHtml(text) {
    return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;")
      .replace(/'/g, "&#39;");
  }

  // Highlights already-escaped code: comments, strings, numbers and keywords, one pass left to right.
  function highlight(escaped) {
    const pattern = /(\/\/[^\n]*|#[^\n]*|\/\*[\s\S]*?\*\/)|(&quot;(?:[^&\n]|&(?!quot;))*?&quot;|&#39;(?:[^&\n]|&(?!#39;))*?&#39;|`[^`\n]*`)|(\b\d+(?:\.\d+)?\b)|([A-Za-z_][A-Za-z0-9_]*)/g;
    return escaped.replace(pattern, (match, comment, string, number, word) => {
      if (comment) return `<span class="tok-com">${comment}</span>`;
      if (string) return `<span class="tok-str">${string}</span>`;
      if (number) return `<span class="tok-num">${number}</span>`;
      if (word && KEYWORDS.has(word)) return `<span class="tok-kw">${word}</span>`;
      return match;
    });
  }

  function inline(text) {
    const codes = [];
    let out = text.replace(/`([^`\n]+)`/g, (_, code) => { codes.push(code); return `\u0000${codes.length - 1}\u0000`; });
    out = out.replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g,
      (_, label, url) => `<a href="${url}" target="_blank" rel="noopener noreferrer">${label}</a>`);
    out = out.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>").replace(/__([^_\n]+)__/g, "<strong>$1</strong>");
    out = out.replace(/(^|[^*])\*([^*\n]+)\*/g, "$1<em>$2</em>").replace(/(^|[^\w])_([^_\n]+)_(?!\w)/g, "$1<em>$2</em>");
    return out.replace(/\u0000(\d+)\u0000/g, (_, i) => `<code>${codes[Number(i)]}</code>`);
  }

  function render(source) {
    const lines = escapeHtml(source).split("\n");
    const html = [];
    let paragraph = [];
    let list = null;  // "ul" or "ol"
    const flush = () => {
      if (paragraph.length) { html.push(`<p>${inline(paragraph.join("<br>"))}</p>`); paragraph = []; }
      if (list) { html.push(`</${list}>`); list = null; }
    };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = line.match(/^\s*```\s*([\w+#.-]*)\s*$/);
      if (fence) {
        flush();
        const code = [];
        i++;
        while (i < lines.length && !/^\s*```\s*$/.test(lines[i])) code.push(lines[i++]);
        const lang = fence[1] ? ` class="language-${fence[1]}"` : "";
        html.push(`<pre><code${lang}>${highlight(code.join("\n"))}</code></pre>`);
        continue;
      }
      const heading = line.match(/^(#{1,6})\s+(.*)$/);
      const bullet = line.match(/^\s*[-*+]\s+(.*)$/);
      const numbered = line.match(/^\s*\d+[.)]\s+(.*)$/);
      const quote = line.match(/^&gt;\s?(.*)$/);
      if (heading) {
        flush();
        const level = Math.min(heading[1].length + 2, 6);  // answers sit under the page's own headings
        html.push(`<h${level}>${inline(heading[2])}</h${level}>`);
      } else if (bullet || numbered) {
        if (paragraph.length) { html.push(`<p>${inline(paragraph.join("<br>"))}</p>`); paragraph = []; }
        const kind = bullet ? "ul" : "ol";
        if (list !== kind) { if (list) html.push(`</${list}>`); html.push(`<${kind}>`); list = kind; }
        html.push(`<li>${inline((bullet || numbered)[1])}</li>`);
      } else if (quote) {
        flush();
        html.push(`<blockquote>${inline(quote[1])}</blockquote>`);
      } else if (!line.trim()) {
        flush();
      } else {
        if (list) { html.push(`</${list}>`); list = null; }
        paragraph.push(line);
      }
    }
    flush();
    return html.join("");
  }

  window.HearthMarkdown = { render, escapeHtml };
})();
