"""Grace's stylesheet, script and icon, served as files from /static/ so the CSP can forbid every inline script and style.

Kept as Python strings so the kernel stays a plain package (no data files to ship). The script
only adds conveniences; every page works without it. It never builds HTML: text goes in through
`value` and `textContent`, and the CSP requires Trusted Types, so an `innerHTML` would throw.
"""

from __future__ import annotations

import hashlib

CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:0;background:#f6f7f9;color:#1d2330;line-height:1.45}
a{color:#1f5fbf;text-decoration:none}a:hover{text-decoration:underline}
header.top{background:#1d2330;color:#fff;padding:.7rem 2rem;display:flex;align-items:center;gap:2rem;flex-wrap:wrap}
header.top .brand{font-weight:700;font-size:1.15rem;letter-spacing:.01em;color:#fff;display:flex;align-items:center;gap:.6rem}
header.top .brand img{width:28px;height:28px}
header.top .brand small{display:block;font-weight:400;font-size:.75rem;color:#aab2c2;letter-spacing:0}
header.top nav{display:flex;gap:.25rem;flex:1;flex-wrap:wrap}
header.top nav a{color:#c8cdd8;padding:.35rem .7rem;border-radius:6px;font-size:.93rem}
header.top nav a:hover{background:#2b3344;color:#fff;text-decoration:none}
header.top nav a.active{background:#3a4458;color:#fff}
header.top .who{display:flex;align-items:center;gap:.75rem;font-size:.9rem;color:#c8cdd8}
header.top .who strong{color:#fff}
header.top form{margin:0}
main{padding:1rem 2rem 2rem;max-width:76rem}
h1.page{font-size:1.35rem;margin:.75rem 0 .25rem}p.lead{margin:0 0 1rem;color:#5a6272}
section{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:1rem 1.25rem;margin:1rem 0}
h2{font-size:1.05rem;margin:0 0 .75rem}h3{font-size:.98rem;margin:0 0 .5rem}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.45rem .5rem;border-bottom:1px solid #eef0f4;vertical-align:top;font-size:.92rem}
th{color:#5a6272;font-weight:600;white-space:nowrap}tr:last-child td{border-bottom:0}
.ok{color:#137333;font-weight:600}.bad{color:#b3261e;font-weight:600}.warn{color:#a15c00;font-weight:600}
code{background:#f0f2f5;padding:0 .25rem;border-radius:3px;font-size:.85rem}.muted{color:#6b7280}
pre{margin:0;white-space:pre-wrap;word-break:break-word;font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.85rem}
.nowrap{white-space:nowrap}.small{font-size:.82rem}.spaced{margin-top:1rem}
.badge{display:inline-block;padding:.05rem .45rem;border-radius:999px;font-size:.75rem;font-weight:600;background:#eef0f4;color:#3d4555}
.badge.ok{background:#e6f4ea;color:#137333}.badge.bad{background:#fce8e6;color:#b3261e}.badge.warn{background:#fef3e0;color:#a15c00}
.badge.kind-request{background:#e8f0fe;color:#1f5fbf}.badge.kind-reply{background:#e6f4ea;color:#137333}
.badge.kind-error{background:#fce8e6;color:#b3261e}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(15rem,1fr));gap:1rem;margin:1rem 0}
.cards section{margin:0}.stat{font-size:1.6rem;font-weight:700;margin:.1rem 0}
dl.kv{display:grid;grid-template-columns:max-content minmax(0,1fr);gap:.25rem .9rem;margin:0;font-size:.9rem}
dl.kv dt{color:#5a6272}dl.kv dd{margin:0;word-break:break-word}
button,.button{font:inherit;font-size:.93rem;border:1px solid #1f5fbf;background:#1f5fbf;color:#fff;border-radius:6px;
 padding:.45rem 1rem;cursor:pointer}
button:hover{background:#174a96}button:disabled{opacity:.6;cursor:progress}
button.quiet{background:transparent;border-color:#56607a;color:#c8cdd8;padding:.25rem .7rem}
button.quiet:hover{background:#2b3344;color:#fff}
input[type=password],input[type=text],textarea{font:inherit;width:100%;padding:.55rem .65rem;border:1px solid #c9ced8;
 border-radius:6px;background:#fff;color:#1d2330}
input:focus,textarea:focus{outline:2px solid #8ab4f8;border-color:#1f5fbf}
textarea{resize:vertical;min-height:4.5rem}
label{display:block;font-weight:600;margin:0 0 .35rem;font-size:.92rem}
.alert{border-radius:6px;padding:.65rem .85rem;margin:0 0 1rem;font-size:.92rem}
.alert.error{background:#fce8e6;color:#8c1d18;border:1px solid #f5c2bd}
.alert.info{background:#e8f0fe;color:#174a96;border:1px solid #c6d8fb}
.signin{max-width:26rem;margin:10vh auto;padding:0 1rem}
.signin section{padding:1.5rem 1.75rem}.signin h1{font-size:1.3rem;margin:0 0 .25rem;display:flex;align-items:center;gap:.6rem}
.signin h1 img.mark{width:30px;height:30px}
.signin form button{width:100%;margin-top:1rem}
.chat{display:grid;grid-template-columns:minmax(0,1fr) 19rem;gap:1rem;align-items:start}
@media (max-width:60rem){.chat{grid-template-columns:1fr}}
.log{max-height:62vh;overflow-y:auto;padding:.25rem .25rem .5rem;display:flex;flex-direction:column;gap:.6rem}
.msg{max-width:85%;border:1px solid #dde1e8;border-radius:10px;padding:.5rem .75rem;background:#fff}
.msg .meta{font-size:.75rem;color:#6b7280;margin-bottom:.2rem}.msg .meta strong{color:#3d4555}
.msg .text{white-space:pre-wrap;word-break:break-word}.msg pre{max-height:22rem;overflow:auto}
.msg.mine{align-self:flex-end;background:#e8f0fe;border-color:#c6d8fb}
.msg.error{border-color:#f5c2bd;background:#fdf3f2}
.hop{align-self:center;font-size:.75rem;color:#6b7280}
.compose{margin-top:.75rem;border-top:1px solid #eef0f4;padding-top:.75rem}
.compose .row{display:flex;gap:.5rem;align-items:flex-end}.compose textarea{flex:1}
.hint{font-size:.8rem;color:#6b7280;margin:.35rem 0 0}
.tools{list-style:none;margin:0;padding:0;max-height:60vh;overflow-y:auto}
.tools li{padding:.35rem 0;border-bottom:1px solid #eef0f4;font-size:.85rem}.tools li:last-child{border-bottom:0}
.tools button.insert{background:none;border:0;color:#1f5fbf;padding:0;font-family:ui-monospace,Menlo,Consolas,monospace;
 font-size:.83rem;text-align:left}
.tools button.insert:hover{text-decoration:underline;background:none}
footer{padding:0 2rem 1.5rem;color:#8a91a0;font-size:.8rem}
/* tool answers: a table per list of objects, fields per object, the raw JSON folded */
.scroll{overflow-x:auto;max-width:100%}
table.records{word-break:normal;overflow-wrap:normal}table.records th,table.records td{font-size:.84rem;padding:.3rem .35rem}
table.records th{white-space:normal;font-size:.78rem}table.records td{overflow-wrap:break-word}
table.records .text,.result .long{overflow-wrap:anywhere}
.pair .key{color:#5a6272;font-size:.78rem}
table.records .nowrap{white-space:normal}
table.records td .text{white-space:pre-wrap;display:inline-block;min-width:12ch}
code.id{font-size:.75rem;overflow-wrap:anywhere;background:none;padding:0;color:#3d4555;display:inline-block;
 min-width:11ch;max-width:100%}
code.json{overflow-wrap:anywhere;font-size:.78rem}
dl.fields{font-size:.88rem}dl.fields dl.fields{font-size:.84rem}dl.fields>.wide{grid-column:1/-1}
ul.items{margin:0;padding-left:1.1rem}
details.nested>summary,details.raw>summary{cursor:pointer;color:#1f5fbf;font-size:.8rem;width:max-content}
details.raw{margin-top:.5rem}
details.raw>pre{margin-top:.35rem;max-height:22rem;overflow:auto;background:#f6f7f9;border:1px solid #eef0f4;
 border-radius:4px;padding:.4rem .5rem}
.result .muted.small{margin:.35rem 0 0}
.msg.result{max-width:100%;align-self:stretch}
/* the audit log fits its box: long subjects, details and addresses wrap */
table.audit td:nth-child(1),table.audit td:nth-child(2),table.audit td:nth-child(6){white-space:nowrap}
table.audit td:nth-child(3),table.audit td:nth-child(4){overflow-wrap:break-word}
table.audit td:nth-child(5),table.audit td:nth-child(8),table.audit td:nth-child(9){overflow-wrap:anywhere;min-width:6.5rem}
table.audit td:nth-child(7){overflow-wrap:anywhere;min-width:14rem}
table.messages td:nth-child(4){width:70%}table.messages td:nth-child(1) .nowrap{white-space:normal}
/* a phone: each table row becomes a block of labelled lines */
@media (max-width:40rem){
 header.top{padding:.6rem .75rem;gap:.6rem}main{padding:.5rem .75rem 1.5rem}footer{padding:0 .75rem 1rem}
 section{padding:.75rem}.msg{max-width:100%}
 table.stack>thead{position:absolute;width:1px;height:1px;overflow:hidden;clip-path:inset(50%)}
 table.stack,table.stack>tbody,table.stack>tbody>tr,table.stack>tbody>tr>td{display:block;width:100%}
 table.stack>tbody>tr{border-bottom:1px solid #dde1e8;padding:.4rem 0}table.stack>tbody>tr:last-child{border-bottom:0}
 table.stack>tbody>tr>td:nth-child(n){border:0;padding:.1rem 0;min-width:0;width:100%;display:grid;
  grid-template-columns:6.5rem minmax(0,1fr);column-gap:.5rem;overflow-wrap:anywhere;white-space:normal}
 table.stack>tbody>tr>td::before{content:attr(data-label);color:#5a6272;font-weight:600;font-size:.8rem;overflow-wrap:anywhere}
 table.stack>tbody>tr>td:empty{display:none}
 table.stack table.stack>tbody>tr>td:nth-child(n){grid-template-columns:5.6rem minmax(0,1fr)}
 .result .nowrap{white-space:normal}
}
"""

JS = """'use strict';
document.addEventListener('DOMContentLoaded', function () {
  var log = document.getElementById('chat-log');
  if (log) { log.scrollTop = log.scrollHeight; }
  var form = document.getElementById('compose');
  var box = document.getElementById('message');
  if (form && box) {
    box.focus();
    box.addEventListener('keydown', function (ev) {
      if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) {
        ev.preventDefault();
        if (box.value.trim() !== '') { form.requestSubmit(); }
      }
    });
    form.addEventListener('submit', function () {
      var send = document.getElementById('send');
      if (send) { send.disabled = true; send.textContent = 'Working\\u2026'; }
    });
    document.querySelectorAll('button.insert').forEach(function (btn) {
      btn.addEventListener('click', function () {
        box.value = btn.getAttribute('data-command') + ' ';
        box.focus();
      });
    });
  }
});
"""

ICON = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><rect width="32" height="32" rx="7" fill="#2b3344"/>'
    '<path d="M16 5l11 11-11 11L5 16z" fill="#8ab4f8"/><path d="M16 11l5 5-5 5-5-5z" fill="#2b3344"/></svg>'
)

# Versioned URLs: a new kernel's assets are never served from a browser's stale cache.
CSS_PATH = f"/static/grace-{hashlib.sha256(CSS.encode()).hexdigest()[:12]}.css"
JS_PATH = f"/static/grace-{hashlib.sha256(JS.encode()).hexdigest()[:12]}.js"
ICON_PATH = f"/static/grace-{hashlib.sha256(ICON.encode()).hexdigest()[:12]}.svg"
