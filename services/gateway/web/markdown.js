// The Markdown subset answers are written in, built as DOM nodes. Text only ever enters the page
// through createTextNode / textContent, and the one attribute taken from the text, a link's href,
// must parse as an http(s) URL; so a model, a document title or a passage cannot inject markup,
// script or a javascript: link, whatever it says. (Hence no HTML strings here, and no library.)
//
// Blocks: fenced code, headings, lists (nested by indentation), block quotes, rules, paragraphs.
// Inline: `code`, **bold**, *italic*, [links](https://...), bare https:// URLs, and [1] citation markers.

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$/;
const RULE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}>\s?/;
const ITEM = /^( *)([-*+]|\d{1,9}[.)])\s+(.*)$/;

const INLINE = new RegExp(
  [
    /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/.source, // 1, 2: code span
    /\[([^\]\n]+)\]\(([^()\s]+)\)/.source, // 3, 4: link
    /\[(\d{1,3}(?:\s*,\s*\d{1,3})*)\]/.source, // 5: citation markers
    /\b(https?:\/\/[^\s<>"'`]*[^\s<>"'`.,;:!?)\]])/.source, // 6: bare URL
    /\*\*(?=\S)([\s\S]*?\S)\*\*/.source, // 7: bold
    /(?<!\w)__(?=\S)([\s\S]*?\S)__(?!\w)/.source, // 8: bold
    /\*(?=[^\s*])([\s\S]*?[^\s*])\*/.source, // 9: italic
    /(?<!\w)_(?=[^\s_])([\s\S]*?[^\s_])_(?!\w)/.source, // 10: italic
    /\\([\\`*_[\]()#+\-.!>~])/.source, // 11: escaped punctuation
  ].join("|"),
  "g",
);

/**
 * @param {string} text Markdown
 * @param {{citation?: (n: number) => Node | null}} options `citation` turns a `[n]` marker into a node
 *   (null keeps the marker as text, e.g. when there is no source n)
 * @returns {DocumentFragment}
 */
export function renderMarkdown(text, options = {}) {
  const fragment = document.createDocumentFragment();
  appendBlocks(fragment, text.replace(/\r\n?/g, "\n").split("\n"), options);
  return fragment;
}

function appendBlocks(parent, lines, options) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let match;
    if (!line.trim()) {
      i += 1;
    } else if ((match = FENCE.exec(line))) {
      i = appendCode(parent, lines, i, match[1], match[2]);
    } else if ((match = HEADING.exec(line))) {
      const heading = element(`h${Math.min(match[1].length + 2, 6)}`);
      appendInline(heading, match[2], options);
      parent.append(heading);
      i += 1;
    } else if (RULE.test(line)) {
      parent.append(element("hr"));
      i += 1;
    } else if (QUOTE.test(line)) {
      const quoted = [];
      while (i < lines.length && QUOTE.test(lines[i])) quoted.push(lines[i++].replace(QUOTE, ""));
      const quote = element("blockquote");
      appendBlocks(quote, quoted, options);
      parent.append(quote);
    } else if (ITEM.test(line)) {
      i = appendList(parent, lines, i, options);
    } else {
      i = appendParagraph(parent, lines, i, options);
    }
  }
}

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line);
}

/** A fenced block runs to its closing fence, or to the end while the answer is still streaming. */
function appendCode(parent, lines, start, fence, language) {
  const closing = new RegExp(`^ {0,3}${fence[0]}{${fence.length},}\\s*$`);
  const body = [];
  let i = start + 1;
  while (i < lines.length && !closing.test(lines[i])) body.push(lines[i++]);
  const pre = element("pre");
  const code = element("code");
  if (language) code.dataset.language = language;
  code.textContent = body.join("\n");
  pre.append(code);
  parent.append(pre);
  return i + 1;
}

function appendList(parent, lines, start, options) {
  const [, indent, marker] = ITEM.exec(lines[start]);
  const ordered = /\d/.test(marker);
  const list = element(ordered ? "ol" : "ul");
  if (ordered && Number.parseInt(marker, 10) !== 1) list.start = Number.parseInt(marker, 10);
  const sameList = (match) => match && match[1].length === indent.length && /\d/.test(match[2]) === ordered;
  let i = start;
  while (i < lines.length) {
    const match = ITEM.exec(lines[i]);
    if (!sameList(match)) break;
    const body = [match[3]];
    const contentIndent = match[1].length + match[2].length + 1;
    i += 1;
    while (i < lines.length) {
      const next = lines[i];
      if (!next.trim()) {
        const following = lines.slice(i + 1).find((line) => line.trim());
        if (following === undefined || leadingSpaces(following) <= indent.length) break;
        body.push("");
      } else if (leadingSpaces(next) <= indent.length && startsBlock(next)) {
        break;
      } else {
        body.push(next.slice(Math.min(leadingSpaces(next), contentIndent)));
      }
      i += 1;
    }
    list.append(listItem(body, options));
    // Blank lines between two items of the same list keep the list going.
    let next = i;
    while (next < lines.length && !lines[next].trim()) next += 1;
    if (next > i && sameList(ITEM.exec(lines[next] || ""))) i = next;
  }
  parent.append(list);
  return i;
}

function listItem(body, options) {
  const item = element("li");
  appendBlocks(item, body, options);
  // A one-paragraph item reads as a tight list: its text sits directly in the <li>.
  if (item.firstChild?.nodeName === "P") item.firstChild.replaceWith(...item.firstChild.childNodes);
  return item;
}

function appendParagraph(parent, lines, start, options) {
  const body = [lines[start].trim()];
  let i = start + 1;
  while (i < lines.length && lines[i].trim() && !startsBlock(lines[i])) body.push(lines[i++].trim());
  const paragraph = element("p");
  appendInline(paragraph, body.join("\n"), options);
  parent.append(paragraph);
  return i;
}

function appendInline(parent, text, options) {
  let last = 0;
  for (const match of text.matchAll(INLINE)) {
    appendText(parent, text.slice(last, match.index));
    last = match.index + match[0].length;
    const [whole, , code, label, href, markers, url, bold1, bold2, italic1, italic2, escaped] = match;
    if (code !== undefined) {
      const span = element("code");
      span.textContent = code;
      parent.append(span);
    } else if (label !== undefined) {
      appendLink(parent, safeHref(href), label, whole);
    } else if (markers !== undefined) {
      appendCitations(parent, markers, whole, options);
    } else if (url !== undefined) {
      appendLink(parent, safeHref(url), null, whole);
    } else if (bold1 !== undefined || bold2 !== undefined) {
      const strong = element("strong");
      appendInline(strong, bold1 ?? bold2, options);
      parent.append(strong);
    } else if (italic1 !== undefined || italic2 !== undefined) {
      const emphasis = element("em");
      appendInline(emphasis, italic1 ?? italic2, options);
      parent.append(emphasis);
    } else {
      appendText(parent, escaped);
    }
  }
  appendText(parent, text.slice(last));
}

function appendLink(parent, href, label, literal) {
  if (!href) {
    appendText(parent, literal);
    return;
  }
  const link = element("a");
  link.href = href;
  link.rel = "noopener noreferrer";
  link.target = "_blank";
  if (label === null) link.textContent = href;
  else appendInline(link, label, {});
  parent.append(link);
}

function appendCitations(parent, markers, literal, options) {
  const numbers = markers.split(",").map((number) => Number.parseInt(number, 10));
  const nodes = numbers.map((number) => options.citation?.(number) ?? null);
  if (nodes.includes(null)) {
    appendText(parent, literal);
    return;
  }
  parent.append(...nodes);
}

/** Only http(s) links: no javascript:, data: or relative URLs from untrusted text. */
export function safeHref(raw) {
  try {
    const url = new URL(raw);
    return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
  } catch {
    return null;
  }
}

function appendText(parent, text) {
  text.split("\n").forEach((part, n) => {
    if (n) parent.append(element("br"));
    if (part) parent.append(document.createTextNode(part));
  });
}

function leadingSpaces(line) {
  return line.length - line.trimStart().length;
}

function element(name) {
  return document.createElement(name);
}
