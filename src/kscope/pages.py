"""What every static HTML page kscope writes shares: its style, and the self-check that the browser test reads (every
image decodes, no table is empty, no script error: ``<body data-check="ok">``)."""

CHECK = """<script>window.__errors=[];window.addEventListener('error',function(e){window.__errors.push(String(e.message||e))});
window.addEventListener('load',function(){var bad=[];for(var i=0;i<document.images.length;i++){var im=document.images[i];
if(!im.complete||im.naturalWidth===0)bad.push('broken image '+im.getAttribute('src'))}
var ts=document.getElementsByTagName('table');for(var j=0;j<ts.length;j++){if(ts[j].getElementsByTagName('td').length===0)bad.push('empty table')}
bad=bad.concat(window.__errors.map(function(m){return 'script error '+m}));document.body.setAttribute('data-check',bad.length?bad.join('; '):'ok')});</script>"""
STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse;margin:.6em 0}"
         "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f3f3f3}a{color:#2256a6}"
         ".ctx{font-family:monospace;white-space:pre-wrap;margin:.25em 0;padding:2px 4px;border-left:3px solid #ddd}"
         ".bar{display:inline-block;height:10px;vertical-align:middle}img{max-width:100%}.muted{color:#777}")
