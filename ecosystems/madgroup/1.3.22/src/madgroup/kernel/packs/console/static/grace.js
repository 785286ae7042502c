'use strict';
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
      if (send) { send.disabled = true; send.textContent = 'Working\u2026'; }
    });
    document.querySelectorAll('button.insert').forEach(function (btn) {
      btn.addEventListener('click', function () {
        box.value = btn.getAttribute('data-command') + ' ';
        box.focus();
      });
    });
  }
});
